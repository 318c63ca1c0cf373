"""Lab model families: shapes, the options they promise, and skips that start as the identity."""

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.lab import CNNSpec, MLPSpec, RNNSpec, build_cnn, build_mlp, build_rnn


@pytest.mark.parametrize("skip", ["none", "residual", "rezero", "long"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_mlp_variants_run(skip, norm):
    model = build_mlp(MLPSpec(depth=5, width=16, activation="tanh", norm=norm, skip=skip, dropout=0.1))
    out = model(torch.randn(8, 64))
    assert out.shape == (8, 10)
    out.sum().backward()


def test_mlp_depth_counts_linear_layers_and_inits_apply():
    model = build_mlp(MLPSpec(depth=7, width=32, init="normal1"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 + 1  # depth hidden layers + the head
    assert float(linears[1].weight.detach().std()) == pytest.approx(1.0, rel=0.1)
    he = build_mlp(MLPSpec(depth=3, width=256, init="he"))
    w = [m for m in he.modules() if isinstance(m, nn.Linear)][1].weight.detach()
    assert float(w.var()) == pytest.approx(2 / 256, rel=0.05)


def test_rezero_blocks_start_as_identity_and_change_the_gradient_path():
    plain = build_mlp(MLPSpec(depth=20, width=32, activation="sigmoid"))
    rezero = build_mlp(MLPSpec(depth=20, width=32, activation="sigmoid", skip="rezero"))
    x = torch.randn(4, 64)
    for block in rezero.blocks:
        h = torch.randn(4, 32)
        torch.testing.assert_close(block(h), h)
    # the headline the lab will measure: a 20-layer sigmoid net vanishes, its ReZero twin does not
    assert gm.check(plain, x).of_kind("vanishing_gradients")
    assert not gm.check(rezero, x).of_kind("vanishing_gradients")


@pytest.mark.parametrize("skip", ["none", "residual", "long"])
def test_cnn_on_digit_images(skip):
    model = build_cnn(CNNSpec(depth=4, channels=8, norm="batch", skip=skip))
    out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)


@pytest.mark.parametrize("cell", ["tanh", "relu", "irnn", "lstm", "gru"])
def test_recurrent_cells(cell):
    model = build_rnn(RNNSpec(cell=cell, hidden=8))
    assert model(torch.rand(3, 12, 2)).shape == (3, 1)
    every = build_rnn(RNNSpec(cell=cell, hidden=8, d_in=10, d_out=9, every_step=True))
    assert every(torch.rand(3, 12, 10)).shape == (3, 12, 9)


def test_irnn_and_forget_bias():
    irnn = build_rnn(RNNSpec(cell="irnn", hidden=6))
    torch.testing.assert_close(irnn.rnn.weight_hh_l0.detach(), torch.eye(6))
    lstm = build_rnn(RNNSpec(cell="lstm", hidden=6, forget_bias=True)).rnn
    torch.testing.assert_close((lstm.bias_ih_l0 + lstm.bias_hh_l0)[6:12].detach(), torch.ones(6))
    with pytest.raises(gm.GradmedicError, match="Argument forget_bias"):
        build_rnn(RNNSpec(cell="gru", forget_bias=True))


@pytest.mark.parametrize("field,value,match", [("activation", "swish9", "activation"), ("init", "magic", "init"),
                                               ("skip", "sideways", "skip"), ("depth", 0, "depth")])
def test_bad_specs(field, value, match):
    with pytest.raises(gm.GradmedicError, match=f"Argument {match}"):
        build_mlp(MLPSpec(**{field: value}))


@pytest.mark.parametrize("variant", ["post", "pre", "rezero", "deepnorm", "layerscale"])
def test_transformer_variants_run_and_attend_causally(variant):
    from gradmedic.lab.transformer import TransformerSpec, build_transformer

    model = build_transformer(TransformerSpec(depth=3, variant=variant, vocab=32, max_len=9, d_out=16))
    tokens = torch.randint(0, 32, (4, 9))
    out = model(tokens)
    assert out.shape == (4, 16)
    out.sum().backward()
    block = model.blocks[0]
    h = torch.randn(2, 9, 32)
    changed = h.clone()
    changed[:, -1] += 1.0  # a later position cannot change an earlier one's output (causal attention)
    assert torch.allclose(block(h)[:, :-1], block(changed)[:, :-1], atol=1e-6)


def test_rezero_transformer_starts_as_the_identity_and_deepnorm_scales():
    from gradmedic.lab.transformer import TransformerSpec, build_transformer

    rezero = build_transformer(TransformerSpec(depth=4, variant="rezero"))
    h = torch.randn(2, 5, 32)
    for block in rezero.blocks:
        assert torch.equal(block(h), h)
    deep = build_transformer(TransformerSpec(depth=16, variant="deepnorm"))
    beta = (8 * 16) ** -0.25  # Wang et al. 2022: Xavier-normal with gain beta
    std = float(torch.cat([b.ff[0].weight.detach().flatten() for b in deep.blocks]).std())
    assert std == pytest.approx(beta * (2 / (32 + 64)) ** 0.5, rel=0.05)
    assert deep.blocks[0].a == pytest.approx((2 * 16) ** 0.25)


def test_recall_targets_are_the_value_after_the_queried_key():
    from gradmedic.lab.tasks import RECALL_KEYS, recall

    task = recall(4, n_train=64, n_test=8, seed=1)
    x, y = task.x_train, task.y_train
    assert x.shape == (64, 9) and task.baseline == pytest.approx(torch.log(torch.tensor(16.0)).item())
    for row, target in zip(x, y, strict=True):
        keys, values = row[:-1:2], row[1:-1:2]
        assert len(set(keys.tolist())) == 4 and bool((keys < RECALL_KEYS).all())
        assert int(values[keys == row[-1]]) - RECALL_KEYS == int(target)


def test_jacobian_spectrum_matches_autograd_in_float64():
    from gradmedic.lab.experiment import _jacobian_spectrum

    model = build_mlp(MLPSpec(depth=6, width=16, activation="tanh", init="orthogonal", gain=1.0))
    x = torch.rand(3, 64)
    got = _jacobian_spectrum(model, x)
    m64 = model.double()
    h = m64.stem(x.double())
    conds = []
    for row in h:  # an independent path: torch.autograd.functional.jacobian, float64 throughout
        jac = torch.autograd.functional.jacobian(lambda r: m64.body(r.unsqueeze(0)).squeeze(0), row)
        sv = torch.linalg.svdvals(jac)
        conds.append(float(sv[0] / sv[-1]))
    assert got["cond"] == pytest.approx(sorted(conds)[1], rel=1e-4)  # float32 forward vs float64: 1e-4


def test_orthogonal_gain_1_is_isometric_where_gaussian_is_not():
    from gradmedic.lab import run_experiment

    def cond(init):
        r = run_experiment({"model": "mlp", "spec": {"depth": 20, "activation": "tanh", "init": init, "gain": 1.0},
                            "steps": 1, "jacobian": True})
        return r["jacobian"]["cond"]

    # measured 14 and 1.7e9 (seed 0): eight decades apart, so the 100 and 1e5 cut-offs are far from both
    assert cond("orthogonal") < 100 and cond("glorot") > 1e5


def test_redraw_revives_a_net_born_dead_and_leaves_a_live_one_alone():
    from gradmedic.lab import run_experiment

    base = {"model": "mlp", "spec": {"depth": 20, "width": 6, "activation": "relu", "init": "he"}, "steps": 60,
            "lr": 0.01, "seed": 0}
    dead = run_experiment(base)
    redrawn = run_experiment({**base, "redraw_patience": 5})
    assert dead["final_loss"] > 0.9 * dead["baseline"]  # seed 0's units all die within a few steps: it stalls
    steps = redrawn["redraws"]
    assert steps and steps[0] >= 4 and all(b - a >= 5 for a, b in zip(steps, steps[1:], strict=False))  # patience 5
    alive = {**base, "spec": {"depth": 3, "width": 32, "activation": "relu", "init": "he"}}
    assert run_experiment({**alive, "redraw_patience": 5})["curve"] == run_experiment(alive)["curve"]


def test_warmup_ramps_the_learning_rate():
    from gradmedic.lab.experiment import _schedule, _validate

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = _schedule(_validate({"warmup": 4}), opt)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
