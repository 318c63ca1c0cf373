"""Activation families: how a probe tells, from an activation's output alone, which elements are saturated (the
derivative below SATURATED_DERIVATIVE of its peak) and which units are dead, for each kind of activation a model
can use as a module or call as a function; and the mode that sees the function calls."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradmedic._tensors import sum_of_squares
from gradmedic.architecture import activation_kind

__all__ = ["CALLS_FUNCTIONAL", "CHANNELS_FIRST", "DEAD_FULL_SAMPLES", "DEAD_MARGIN", "SATURATED_DERIVATIVE", "Family",
           "FunctionalWatch", "activation_family", "alive_units", "dead_margin", "tally", "unit_bias",
           "unit_scale"]

# A unit passes on less than 1/20 of the gradient it would in its linear region once its derivative
# falls below 5% of the peak (tanh: |y| > 0.975; sigmoid: y < 0.0127 or y > 0.987). Ten such layers in
# a row cut the gradient by 1e-13, which is the regime Glorot & Bengio (2010) describe for sigmoid nets.
SATURATED_DERIVATIVE = 0.05
# A ReLU unit is dead for every input, not merely off for this batch, when even its largest pre-activation
# in the batch lies more than DEAD_MARGIN spreads below zero, the spread being the (robust) standard
# deviation over the layer's units of their mean pre-activation (how far other inputs could move it), or,
# where the layer before it is known (unit_scale), the scale its own weights give the layer's input if that is
# smaller: a spread over units is widened by the dead units themselves (60 of 64 units shifted 1-100 of their
# own stds below zero put the median among them and read 48% dead), the weights' scale is not (issue 28).
# Deep plain ReLU nets at He init correlate their inputs, so 25-40% of units are off for a whole batch and
# yet train (issue 9); beyond one spread they show <= 5% (depth 20-80, width 64), a too-hot SGD run (lr 3)
# 16-22%, a bias shifted to -4 100% (tests/test_diagnosis.py, tests/test_check.py).
DEAD_MARGIN = 1.0
# That margin holds for a unit read over at least DEAD_FULL_SAMPLES inputs (samples x positions); over fewer, the
# margin widens (dead_margin). A healthy unit is called dead when all of its n inputs land beyond the margin: for
# one spread a normal tail of 16%, so 0.16^n, 3e-7 at n = 8. Read over one input, 16% of healthy units were
# "dead": the experts of a small Switch Transformer, which get 1-4 tokens each, read 17% dead at init (a warning).
DEAD_FULL_SAMPLES = 8



@functools.lru_cache(maxsize=64)
def dead_margin(samples: int) -> float:
    """How many spreads below zero a unit's largest pre-activation over ``samples`` inputs must lie for it to be
    dead: DEAD_MARGIN from DEAD_FULL_SAMPLES inputs on; below, the margin m at which a healthy unit is called dead
    no more often, P(z < -m)^n = P(z < -DEAD_MARGIN)^DEAD_FULL_SAMPLES (normal, independent inputs): 4.9 spreads
    for one input, 3.2 for two, 1.96 for four. A layer dead outright (a bias far below zero) lies beyond any of
    them, so a small batch still shows it."""
    if samples >= DEAD_FULL_SAMPLES:
        return DEAD_MARGIN
    normal = statistics.NormalDist()
    return -normal.inv_cdf(normal.cdf(-DEAD_MARGIN) ** (DEAD_FULL_SAMPLES / max(samples, 1)))


# The rms of a normalising layer's normalised input (batch, layer, group and instance norm divide by the std they
# subtract the mean of), so that what its affine weight gamma makes of it has the scale |gamma|.
NORMALISED_RMS = 1.0


def unit_scale(layer: nn.Module, inp: Any, units: int) -> torch.Tensor | None:
    """Per unit (units,), the scale that a unit's own weights give the layer's input, without its bias: for a Linear
    or a convolution ||w_j|| x rms(input), the spread of w.x over units whose weights point anywhere (w.x of a
    direction uniform on the sphere has the rms ||w|| ||x|| / sqrt(fan-in)); for an affine normalisation |gamma_j|
    (its input normalised to rms NORMALISED_RMS). A bias shifted below zero, the way units die outright, leaves it
    as it was, and weights turned against the input lie many of it below zero (up to sqrt(fan-in)). None for any
    other layer (a transposed convolution, a layer whose weight is not a plain tensor): no such reference there."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight.data) is not torch.Tensor or weight.shape[0] != units:
        return None
    w = weight.detach()
    if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(layer, "transposed", False):
        if not isinstance(inp, torch.Tensor) or not inp.is_floating_point() or inp.numel() == 0:
            return None
        rms = (sum_of_squares(inp) / inp.numel()).sqrt()
        return torch.linalg.vector_norm(w.float().flatten(1), dim=1) * rms
    if isinstance(layer, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and w.dim() == 1:
        return w.float().abs() * NORMALISED_RMS
    return None


def unit_bias(layer: nn.Module, units: int) -> torch.Tensor | None:
    """The layer's bias per unit (units,), where unit_scale reads the layer: the other part of a unit's place."""
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor) or type(bias.data) is not torch.Tensor or bias.shape != (units,):
        return None
    return bias.detach().float()


def alive_units(y: torch.Tensor, pre: torch.Tensor | None, others: tuple[int, ...], margin: float,
                scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """How many units (0-d) are not dead for every input: their largest pre-activation above ``margin`` spreads below
    zero (DEAD_MARGIN, dead_margin); without the pre-activation, units on for this batch. ``others``: the axes that
    are not the units'. The spread is robust (1.4826 x the median absolute deviation of the units' mean
    pre-activations = the std of a Gaussian), so that a few dead units' far-negative means do not widen it; with
    ``scale`` (per unit: unit_scale) it is at most the spread a healthy unit's place has without the spread over
    units: its weights' scale on the input, and the spread of the biases (``bias``) of the units on for some input
    of the batch (1.4826 x their median absolute deviation), the lottery of a fresh layer's biases (PyTorch's
    U(+-1/sqrt(fan-in)) is half the weights' scale at a fan-in of 4), read from live units so that biases shifted
    to kill units do not widen it. When most units die they move the median and the deviations of the spread over
    units themselves; these stay (issue 28: 60 of 64 units 1-100 own stds below zero read 48% dead by the spread
    alone)."""
    if pre is None or pre.shape != y.shape:
        return (y.amax(dim=others) > 0).sum()
    pre = pre.detach().float()
    top = pre.amax(dim=others)  # (units,) the largest pre-activation each unit saw
    means = pre.mean(dim=others)
    spread = 1.4826 * (means - means.median()).abs().median()
    if scale is not None:
        ref = scale.to(spread.device)
        if bias is not None:
            live = torch.where(top > 0, bias.to(spread.device), math.nan)  # nanmedian: no host sync
            lottery = torch.nan_to_num(1.4826 * (live - live.nanmedian()).abs().nanmedian(), nan=0.0)
            ref = torch.sqrt(ref.square() + lottery.square())
        spread = torch.minimum(spread, ref)
    return ((top > 0) | (top > -margin * spread)).sum()


@dataclass(frozen=True)
class Family:
    name: str
    # output -> 0-d count of saturated elements, a float (see tally); written per family with the fewest
    # full-size passes (var_mean is ~20x slower than a sum)
    saturated: Callable[[torch.Tensor], torch.Tensor] | None
    dies: bool  # has a zero region with zero gradient (ReLU family)


def tally(marks: torch.Tensor) -> torch.Tensor:
    """The number of nonzero entries of ``marks``, a float temporary of the caller's (overwritten), as a 0-d float.

    Marked in place as 1.0/0.0 and summed as floats: torch's CPU kernels for boolean masks
    (``count_nonzero``, a comparison that makes a bool tensor, its sum) are not vectorised, and were 1.6x
    slower on a 64x256 tanh output, 2.8x on 128x512 and 16x on a 64x32x28x28 map (4.7 ms against 0.34 ms) than
    ``ne_`` + ``sum`` on this machine (benchmarks: BENCHMARKS.md). A NaN entry counts, as with
    ``count_nonzero``. The float sum is exact up to 2**24 marks and within ~1e-7 relative beyond: the count
    only ever becomes a share."""
    return marks.ne_(0).sum()


def _outside(center: float, half_width: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Count |y - center| >= half_width."""
    if center == 0.0:
        return lambda y: y.abs().ge_(half_width).sum()
    return lambda y: (y - center).abs_().ge_(half_width).sum()


def _beyond(center: float, half_width: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Count |y - center| > half_width with ``hardshrink`` (y where |y| > lambda, else 0), one kernel fewer
    than abs + compare. Strict, which differs from ``>=`` only on a set of measure zero for the smooth
    families it is used for (an output exactly at the edge); an exact zero output can never count, since
    half_width > 0. A NaN output would count: ``collect`` leaves the saturated share of a row whose outputs
    were not finite unset."""
    if center == 0.0:
        return lambda y: tally(torch.hardshrink(y, half_width))
    return lambda y: tally(torch.hardshrink(y - center, half_width))


def _bounds(lo: float, hi: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Count y <= lo or y >= hi (the flat parts of hardtanh-like functions, derivative exactly 0)."""
    return _outside((lo + hi) / 2, (hi - lo) / 2)


_SIGMOID_EDGE = math.sqrt(0.25 - 0.25 * SATURATED_DERIVATIVE)  # y(1-y) < 0.25 c  <=>  |y - 1/2| > this
SIGMOID = Family("sigmoid", _beyond(0.5, _SIGMOID_EDGE), False)
TANH = Family("tanh", _beyond(0.0, math.sqrt(1 - SATURATED_DERIVATIVE)), False)  # 1 - y^2 < c
SOFTSIGN = Family("softsign", _beyond(0.0, 1 - math.sqrt(SATURATED_DERIVATIVE)), False)  # (1-|y|)^2 < c
HARDSIGMOID = Family("hardsigmoid", _bounds(0.0, 1.0), False)
RELU = Family("relu", None, True)
RELU6 = Family("relu6", lambda y: (y - 6.0).ge_(0).sum(), True)  # y - 6 >= 0 exactly when y >= 6
OTHER = Family("other", None, False)  # non-saturating, non-dying: mean and std only

_OTHER_TYPES = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus,
                nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink)


def activation_family(module: nn.Module) -> Family | None:
    """The family of an activation module, or None for anything that is not an activation."""
    if isinstance(module, nn.ReLU6):  # a Hardtanh subclass: test first
        return RELU6
    if isinstance(module, nn.Hardtanh):
        return Family("hardtanh", _bounds(module.min_val, module.max_val), False)
    if isinstance(module, nn.ReLU):
        return RELU
    for kind, family in ((nn.Sigmoid, SIGMOID), (nn.Tanh, TANH), (nn.Softsign, SOFTSIGN),
                         (nn.Hardsigmoid, HARDSIGMOID)):
        if isinstance(module, kind):
            return family
    # a smooth activation of another library (transformers' NewGELUActivation, timm's GELUTanhApprox), known to the
    # one table of module classes: its own forward's torch.tanh is part of GELU's formula, not a saturating unit
    if isinstance(module, _OTHER_TYPES) or activation_kind(module) == "smooth":
        return OTHER
    return None


def _hardtanh_family(args: tuple, kwargs: dict) -> Family:
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return Family("hardtanh", _bounds(float(lo), float(hi)), False)


_FUNCTIONAL: dict[Any, Family | Callable[[tuple, dict], Family]] = {
    F.relu: RELU, torch.relu: RELU, torch.relu_: RELU, torch.Tensor.relu: RELU, torch.Tensor.relu_: RELU,
    F.relu6: RELU6,
    F.sigmoid: SIGMOID, torch.sigmoid: SIGMOID, torch.Tensor.sigmoid: SIGMOID, torch.Tensor.sigmoid_: SIGMOID,
    F.tanh: TANH, torch.tanh: TANH, torch.Tensor.tanh: TANH, torch.Tensor.tanh_: TANH,
    F.softsign: SOFTSIGN, F.hardsigmoid: HARDSIGMOID, F.hardtanh: _hardtanh_family,
}

CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                   nn.LocalResponseNorm)


CALLS_FUNCTIONAL = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class FunctionalWatch(TorchFunctionMode):
    """Reports calls of known activation functions to the probe; passes everything through."""

    def __init__(self, on_call: Callable[[Family, Any, Any], None]):
        super().__init__()
        self.on_call = on_call
        # >0 while our handler runs: torch has popped the mode for that time and pushes it back after,
        # so __exit__ must not be called from inside (it would pop someone else's mode, or nothing)
        self.inside = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        family = _FUNCTIONAL.get(func)
        if family is None:  # every torch call of a watched forward comes through here: pass it on first
            return func(*args, **kwargs)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        inplace = getattr(func, "__name__", "").endswith("_") or kwargs.get("inplace") is True or (
            len(args) > 1 and args[1] is True)
        if x is not None and inplace:
            x = x.detach().clone()  # an in-place op overwrites its input
        out = func(*args, **kwargs)
        self.inside += 1
        try:
            self.on_call(family if isinstance(family, Family) else family(args, kwargs), out, x)
        finally:
            self.inside -= 1
        return out
