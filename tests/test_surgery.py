"""Surgery returns a working copy; parameter counts change exactly as they should."""

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.remedies import Residual, add_normalization, add_residual, swap_activation
from tests.zoo import mlp


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def runs(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_swap_activation_keeps_parameters_and_the_original():
    model = mlp(4, 16, nn.Sigmoid)
    swapped = swap_activation(model, to="gelu")
    assert count(swapped) == count(model)
    assert sum(isinstance(m, nn.GELU) for m in swapped.modules()) == 4
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 4  # untouched
    runs(swapped, torch.randn(3, 16))
    with pytest.raises(gm.GradmedicError, match="found no"):
        swap_activation(mlp(2, 4, nn.ReLU))
    with pytest.raises(gm.GradmedicError, match="Argument to should be"):
        swap_activation(model, to="swish9000")


def test_add_normalization_adds_two_parameters_per_feature():
    model = mlp(4, 16, nn.Tanh)
    normed = add_normalization(model)
    assert count(normed) == count(model) + 4 * 2 * 16  # four hidden layers; the output layer untouched
    assert sum(isinstance(m, nn.BatchNorm1d) for m in normed.modules()) == 4
    runs(normed, torch.randn(5, 16))
    layer = add_normalization(model, kind="layer")
    assert sum(isinstance(m, nn.LayerNorm) for m in layer.modules()) == 4


def test_add_normalization_on_conv_uses_batchnorm2d():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    normed = add_normalization(model, inputs=torch.randn(2, 1, 8, 8))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == 2
    runs(normed, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("rezero", [True, False])
def test_add_residual(rezero):
    model = mlp(6, 16, nn.ReLU)  # Linear(16,16) x6 + ReLU, Linear(16, 4)
    res = add_residual(model, rezero=rezero)
    blocks = [m for m in res if isinstance(m, Residual)]
    assert len(blocks) == 5  # the first and last units are never wrapped
    assert count(res) == count(model) + (len(blocks) if rezero else 0)  # one alpha per block
    x = torch.randn(3, 16)
    if rezero:
        for block in blocks:
            torch.testing.assert_close(block(x), x)  # alpha = 0: every block starts as the identity
    runs(res, x)


def test_add_residual_measures_conv_shapes():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(2, 1, 8, 8)
    res = add_residual(model, inputs=x)
    # units: [conv, relu] x3 then [conv, relu, flatten], [linear]; the stride-2 unit and the flattening unit
    # change shape, and the first and last are never wrapped: only the second conv's unit qualifies
    assert [type(m).__name__ for m in res][:3] == ["Conv2d", "ReLU", "Residual"]
    assert sum(isinstance(m, Residual) for m in res) == 1
    runs(res, x)
    with pytest.raises(gm.GradmedicError, match="no same-shape block"):
        add_residual(model)  # without inputs, conv shapes cannot be known
    with pytest.raises(gm.GradmedicError, match="Argument model should be an nn.Sequential"):
        add_residual(nn.Linear(2, 2))
