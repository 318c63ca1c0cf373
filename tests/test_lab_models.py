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
