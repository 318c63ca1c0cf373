"""`gradmedic check --treat N --save PATH` (issue 27): the treated model's state_dict, written atomically and never over
a file without --force, loads into the user's own model class and reproduces the treated model's outputs; a change
of structure says what to apply first, and that path reproduces the outputs too."""

from __future__ import annotations

import copy

import torch

import gradmedic as gm
from examples.sigmoid_mlp import build
from gradmedic._cli_commands import save_treated
from gradmedic.cli import main
from gradmedic.remedies.treatment import Treatment


def _one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_save_round_trip_reproduces_the_treated_model(tmp_path, capsys):
    path = tmp_path / "treated.pt"
    code = _one_thread(lambda: main(["check", "examples/sigmoid_mlp.py:build", "--treat", "0", "--save", str(path)]))
    out = capsys.readouterr().out
    assert code == 0 and path.is_file()
    assert "applied xavier_init" in out and "model.load_state_dict(torch.load(" in out
    # the call that reproduces it, printed once (with the Treatment), not again under the save
    assert out.lower().count("to do the same in your code:") == 1 and "gradmedic.remedies.critical_(" in out
    case = build()  # the user's own class, as the factory builds it
    state = torch.load(path)
    case["model"].load_state_dict(state)
    # the treated model, independently: treat on the same factory's model and report (same seed, same remedy)
    fresh = build()
    treated = gm.treat(fresh["model"], gm.check(fresh["model"], fresh["inputs"], targets=fresh["targets"],
                                                loss_fn=fresh["loss_fn"]), inputs=fresh["inputs"],
                       targets=fresh["targets"], loss_fn=fresh["loss_fn"]).model
    with torch.no_grad():
        assert torch.equal(case["model"](case["inputs"]), treated(case["inputs"]))
        assert not torch.equal(build()["model"](case["inputs"]), treated(case["inputs"]))  # it did change


def test_save_refuses_an_existing_file_without_force(tmp_path, capsys):
    path = tmp_path / "treated.pt"
    path.write_bytes(b"keep me")
    code = main(["check", "examples/sigmoid_mlp.py:build", "--treat", "0", "--save", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "exists; pass --force" in err and err.count("\n") == 1
    assert path.read_bytes() == b"keep me"
    assert _one_thread(lambda: main(["check", "examples/sigmoid_mlp.py:build", "--treat", "0", "--save", str(path),
                                     "--force"])) == 0
    assert isinstance(torch.load(path), dict)


def test_save_needs_treat(tmp_path, capsys):
    code = main(["check", "examples/sigmoid_mlp.py:build", "--save", str(tmp_path / "x.pt")])
    assert code == 2 and "add --treat" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_a_structural_change_says_what_to_apply_and_that_path_reproduces_the_outputs(tmp_path):
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x = torch.randn(32, 8)
    changed = gm.remedies.add_normalization(copy.deepcopy(original), kind="batch", inputs=x)
    treatment = Treatment(model=changed, applied=[("add_normalization", "inserted 1 BatchNorm", "why")])
    error, text = save_treated(treatment, original, str(tmp_path / "t.pt"), False, "f.py:build")
    assert error is None and "changed the model's structure" in text
    # the call to make in code, as howto renders it (the same line the terminal's treatment shows)
    assert 'model = gradmedic.remedies.add_normalization(model, kind="batch", inputs=inputs)' in text
    # what the user does: their class, the same change in code, then the state_dict
    torch.manual_seed(1)  # other weights: everything must come from the file
    mine = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    mine = gm.remedies.add_normalization(mine, kind="batch", inputs=x)
    mine.load_state_dict(torch.load(tmp_path / "t.pt"))
    with torch.no_grad():
        assert torch.equal(mine.eval()(x), changed.eval()(x))
    # loaded straight into the user's unchanged class, it fails loudly: the message above is needed
    try:
        original.load_state_dict(torch.load(tmp_path / "t.pt"))
    except RuntimeError as failure:
        assert "Unexpected key" in str(failure) or "size mismatch" in str(failure)
    else:
        raise AssertionError("a structurally changed state_dict loaded into the unchanged class")
