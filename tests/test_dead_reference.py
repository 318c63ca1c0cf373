"""Dead units against a reference that dead units do not move (issue 28, class 6).

A unit is dead when its largest pre-activation lies beyond a margin below zero. The margin's spread, taken over
the layer's units, is widened by the dead units themselves: with 60 of 64 units 1-100 of their own stds below
zero the median sits among them and the layer read 48% dead. The spread is now bounded by the scale each unit's
weights give the layer's input (``unit_scale``), which a bias shifted below zero does not move. The planted layers
below are dead by construction (each dead unit's largest pre-activation over the batch a known number of its own
stds below zero); their healthy twins have no unit planted.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradmedic as gm
from gradmedic.probes import ActivationProbe
from gradmedic.probes._families import unit_scale

UNITS, DEAD = 64, 60
# the planted depth of each dead unit is log-uniform over this range of its own stds; by the spread over units
# alone 1-100 read 48% and 1-1000 42% (tests/handwritten.py, SICK 6)
SPREADS = [(1.0, 3.0), (1.0, 100.0), (1.0, 1000.0)]


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, UNITS)
        self.head = nn.Linear(UNITS, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)))


def _build(kind: str):
    """(model, input, the module whose bias kills units, the module whose output is the pre-activation)"""
    torch.manual_seed(0)
    if kind == "functional":
        model = FunctionalNet()
        return model, torch.randn(128, 16), model.fc, model.fc
    if kind in ("linear", "linear_inplace"):
        model = nn.Sequential(nn.Linear(16, UNITS), nn.ReLU(inplace=kind == "linear_inplace"), nn.Linear(UNITS, 4))
        return model, torch.randn(128, 16), model[0], model[0]
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(3, UNITS, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
        x = torch.randn(16, 3, 8, 8)
        model(x)  # the lazy head takes its size
        return model, x, model[0], model[0]
    assert kind == "conv_bn"
    model = nn.Sequential(nn.Conv2d(3, UNITS, 3), nn.BatchNorm2d(UNITS), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(16, 3, 8, 8)
    model(x)
    return model, x, model[1], model[1]


def _plant(model, x, shifted, maker, spreads, seed=1):
    """Shift DEAD units' biases so that each one's largest pre-activation over x is log-uniform in ``spreads`` of its
    own stds below zero; returns those depths."""
    seen = {}
    handle = maker.register_forward_hook(lambda m, a, out: seen.__setitem__("pre", out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    pre = seen["pre"]
    others = tuple(d for d in range(pre.dim()) if d != 1)
    top, std = pre.amax(dim=others), pre.std(dim=others)
    lo, hi = spreads
    depth = lo * (hi / lo) ** torch.rand(UNITS, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        shifted.bias[:DEAD] -= top[:DEAD] + depth[:DEAD] * std[:DEAD]
    return depth[:DEAD]


def _dead_share(model, x):
    monitor = gm.Monitor(model, probes=[ActivationProbe()])
    model(x).sum().backward()
    monitor.step()
    monitor.close()
    (share,) = monitor.trace.last("dead_frac").values()
    return share


@pytest.mark.parametrize("kind", ["linear", "linear_inplace", "functional", "conv", "conv_bn"])
@pytest.mark.parametrize("spreads", SPREADS)
def test_a_mostly_dead_layer_reads_mostly_dead(kind, spreads):
    model, x, shifted, maker = _build(kind)
    _plant(model, x, shifted, maker, spreads)
    share = _dead_share(model, x)
    # truth: DEAD/UNITS = 0.9375 are <= 0 on every input. A unit whose weights' scale on the input exceeds its own
    # std by the factor r is counted only beyond r own stds; r is 1.0-1.3 in these layers (ReLU of randn, or
    # BN's |gamma| = its own std), so at most log(1.3)/log(hi/lo) of the dead units, 24% for 1-3, are not counted
    assert 0.70 <= share <= DEAD / UNITS, share


@pytest.mark.parametrize("kind", ["linear", "linear_inplace", "functional", "conv", "conv_bn"])
def test_the_healthy_twins_have_no_dead_units(kind):
    model, x, _, _ = _build(kind)
    assert _dead_share(model, x) <= 0.05


def test_a_unit_dead_by_a_bias_far_below_zero_is_dead_in_a_layer_of_dead_units():
    """Every unit of a layer dead but one: the spread over units is the dead units' own; the weights' scale is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, UNITS), nn.ReLU(), nn.Linear(UNITS, 4))
    with torch.no_grad():
        # -10 .. -1000: each unit's w.x, whose weights' scale on randn inputs is ||w|| = sqrt(16/48) = 0.58, stays
        # below 2.6 x 0.58 = 1.5 over 128 inputs, so all 63 are <= 0 on every input by 8.5 scales or more. The spread
        # over units (1.48 x the median absolute deviation of their means, ~ the biases) is ~130: half read alive
        model[0].bias[1:] = -torch.logspace(1, 3, UNITS - 1)
    assert _dead_share(model, torch.randn(128, 16)) == (UNITS - 1) / UNITS


def test_unit_scale_of_a_linear_layer_is_the_rms_of_random_weights_on_its_input():
    """Hand derivation: for weights with iid entries of variance s^2, E[(w.x)^2] = s^2 ||x||^2 and
    E||w||^2 = fan_in s^2, so the mean over units of (||w|| rms(x))^2 is the mean over units and inputs of (w.x)^2.
    Checked in float64 over 4096 units (relative sampling error ~ sqrt(2/4096) = 2%): within 6%."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 4096).double()
    x = torch.randn(32, 256, dtype=torch.float64) * 3 + 1  # not centred: the mean counts, as it does for w.x
    scale = unit_scale(layer, x, 4096)
    wx = x @ layer.weight.detach().T  # without the bias
    assert scale.pow(2).mean().item() == pytest.approx(wx.pow(2).mean().item(), rel=0.06)
    # and each unit's own: ||w_j|| x rms(x), computed independently
    by_hand = layer.weight.detach().norm(dim=1) * math.sqrt((x ** 2).sum().item() / x.numel())
    assert torch.allclose(scale.double(), by_hand, rtol=1e-5)


def test_unit_scale_of_a_convolution_and_of_a_norm():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 2048, 3).double()
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64) + 0.5
    scale = unit_scale(conv, x, 2048)
    # every output of a convolution without padding is w.patch: the same identity as a Linear's over the patches
    # (each interior pixel is in 9 patches, the border ones in fewer: within 10%)
    wx = F.conv2d(x, conv.weight.detach())
    assert scale.pow(2).mean().item() == pytest.approx(wx.pow(2).mean().item(), rel=0.10)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-3.0, 3.0)
    y = bn(torch.randn(32, 16, 5, 5) * 4 + 2)  # train mode: gamma * (unit-variance input) + beta
    own = (y - bn.bias.view(1, -1, 1, 1)).detach().pow(2).mean(dim=(0, 2, 3)).sqrt()
    assert torch.allclose(unit_scale(bn, None, 16), own, rtol=1e-3)


def test_unit_scale_is_none_where_there_is_no_such_reference():
    assert unit_scale(nn.ConvTranspose2d(4, 8, 3), torch.randn(1, 4, 5, 5), 8) is None
    assert unit_scale(nn.Linear(4, 8), torch.randn(2, 4), 9) is None  # not its units
    assert unit_scale(nn.Linear(4, 8), None, 8) is None
    assert unit_scale(nn.Identity(), torch.randn(2, 8), 8) is None


@pytest.mark.parametrize("fan_in", [2, 4])
def test_the_bias_lottery_of_a_small_fan_in_is_part_of_the_bound(fan_in):
    """PyTorch's default bias, U(+-1/sqrt(fan-in)), is as wide as the weights' scale on a unit-rms input at a small
    fan-in (1/sqrt(3 fan-in) against 1/sqrt(3)): read by the weights' scale alone, healthy units that sit low by
    their bias and are off for a batch of 4 would be dead. The live units' bias spread is part of the bound; biases
    of -20 are not (those units are dead for any input)."""
    off = 0
    for seed in range(10):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(fan_in, UNITS), nn.ReLU(), nn.Linear(UNITS, 2))
        x = torch.randn(4, fan_in)
        off += (model[0](x).detach().amax(0) <= 0).sum().item()  # off for this batch, not dead
        assert _dead_share(model, x) <= 1 / UNITS
        with torch.no_grad():
            model[0].bias[:16] = -20.0
        assert _dead_share(model, x) == 16 / UNITS
    assert off >= 10 * UNITS * 0.1  # the premise: many healthy units are off for a batch of 4
