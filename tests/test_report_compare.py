"""``gradmedic report A B ...``: runs side by side, the findings that differ first; rendered in Chromium."""

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.cli import main
from gradmedic.diagnosis import Finding, Report
from gradmedic.report.compare import differences
from tests.test_report import _browser, _colour_bands, _screenshot


def run(tmp_path, name, activation, depth=10, steps=12, kaiming=False):
    """A deep MLP trained a few steps on a fixed batch; the trace saved as ``name``."""
    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (nn.Linear(24, 24), activation())]
    model = nn.Sequential(*layers, nn.Linear(24, 4))
    if kaiming:  # He init: the gradient keeps its size through ReLU layers
        for m in model[:-1]:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x, y = torch.randn(64, 24), torch.arange(64) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gm.Monitor(model, opt, every=2) as mon:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()
    return mon.trace.save(tmp_path / name)


def finding(kind, severity, layers=("0",)):
    return Finding(kind, severity, list(layers), f"{kind} here")


@pytest.mark.parametrize(("runs", "differ", "share"), [
    ([["vanishing_gradients:error"], []], ["vanishing_gradients"], []),
    ([["dead_units:info"], ["dead_units:info"]], [], ["dead_units"]),
    ([["dead_units:info"], ["dead_units:warning"]], ["dead_units"], []),  # same kind, other severity
    ([["dead_units:info", "vanishing_gradients:error"], ["dead_units:info"], []],
     ["vanishing_gradients", "dead_units"], []),  # worst first
])
def test_differences(runs, differ, share):
    reports = [Report([finding(*f.split(":")) for f in fs]) for fs in runs]
    differing, shared = differences(reports)
    assert [k for k, _ in differing] == differ and [k for k, _ in shared] == share


def test_two_traces_side_by_side_with_what_differs_first_in_chromium(tmp_path, capsys):
    sick = run(tmp_path, "sigmoid.gmtrace", nn.Sigmoid)
    well = run(tmp_path, "relu.gmtrace", nn.ReLU, kaiming=True)
    out = tmp_path / "compare.html"
    assert main(["report", str(sick), str(well), "-o", str(out)]) == 0
    assert "Comparison of 2 runs written to" in capsys.readouterr().out
    page = out.read_text()
    order = [page.index(s) for s in ("Findings that differ", "vanishing_gradients", "not found", "<h2>Runs",
                                     "<h2>Figures", "<img ")]
    assert order == sorted(order)
    assert page.count("<img ") == 2 and "sigmoid.gmtrace" in page and "relu.gmtrace" in page
    browser = _browser()
    shot = tmp_path / "compare.png"
    image = _screenshot(browser, out, shot)
    bands, _ = _colour_bands(image)
    assert len(bands) == 2, bands  # the per-layer profiles and the loss curves
    first_figure = bands[0][0]
    rows = image[:first_figure]
    assert ((rows[..., 0] > 0.9) & (rows[..., 1] < 0.9) & (rows[..., 2] < 0.9)).sum() > 500  # the red error row
    if (target := tmp_path.parent.parent / ".screenshots").is_dir():  # pragma: no cover - for a person to look
        (target / "compare.png").write_bytes(shot.read_bytes())


def test_runs_of_different_depths_are_drawn_against_relative_depth(tmp_path):
    a = run(tmp_path, "deep.gmtrace", nn.Tanh, depth=8, steps=4)
    b = run(tmp_path, "shallow.gmtrace", nn.Tanh, depth=3, steps=4)
    out = tmp_path / "c.html"
    assert main(["report", str(a), str(b), str(a), "-o", str(out)]) == 0
    assert out.read_text().count("deep.gmtrace") >= 2


def test_a_file_that_is_not_a_trace_is_one_line_and_exit_2(tmp_path, capsys):
    good = run(tmp_path, "a.gmtrace", nn.Tanh, depth=2, steps=2)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["report", str(good), str(bad), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a trace (.gmtrace)" in err
    assert main(["report", str(good), str(tmp_path / "missing.gmtrace"), "-o", str(tmp_path / "x.html")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_heatmap_step_ticks_are_evenly_spaced():
    import numpy as np

    from gradmedic.report import plots

    fig = plots.gradient_heatmap(list(range(0, 20, 2)), ["a", "b"], np.ones((10, 2)))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["0", "4", "8", "12", "16"]  # every second column; was 0 2 6 8 10 12 16 18
    # a Monitor's steps: the first looks (1, 3, 7, 15) among every 20th; labels by step, not by column
    steps = [0, 1, 3, 7, 15, *range(20, 400, 20)]
    fig = plots.gradient_heatmap(steps, ["a", "b"], np.ones((len(steps), 2)))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "100", "200", "300"]
