"""Critical initialisation: the weight scale that keeps a net of *this depth* trainable (mean-field theory).

For a wide net ``h_{l+1} = W_l phi(h_l) + b_l`` with ``W_l`` entries of variance ``sigma_w^2 / fan_in`` and
zero biases, the pre-activation variance follows ``q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) z)^2]`` and each
layer multiplies the squared gradient norm by ``chi_l = sigma_w^2 E[phi'(sqrt(q_l) z)^2]``, z ~ N(0, 1)
(Poole et al. 2016; Schoenholz et al. 2017). ``chi = 1`` is the order-to-chaos boundary: below it
gradients vanish through depth, above it they explode. For ReLU, ``chi = sigma_w^2 / 2`` at every depth, so
the answer is He's ``sigma_w^2 = 2``; for tanh at zero bias variance the boundary is ``sigma_w^2 = 1``,
not torch's gain ``(5/3)^2 = 2.78``, which is chaotic and stalls a 40-layer net.

``critical_scale`` solves, for the given activation and depth L, ``prod_{l<L} chi_l = 1`` for
``sigma_w^2`` by bisection (Gauss-Hermite quadrature for the expectations, the activation's own torch
forward and autograd for phi and phi'). A shallow tanh net may take more than the boundary value (its
forward signal decays over fewer layers), capped at the textbook gain; a deep one gets close to 1.
Saturating activations are drawn orthogonally (dynamical isometry, Saxe et al. 2014; Pennington et al.
2017), rectifiers Gaussian (orthogonality does not help ReLU, Pennington et al. 2017).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic._errors import bad_argument
from gradmedic.architecture import SATURATING_TYPES
from gradmedic.remedies._weights import writable_weight
from gradmedic.remedies.init import following_activations, gain_name

__all__ = ["critical_", "critical_scale", "gradient_gain"]

# E[f(sqrt(q) z)] by the trapezoid rule on 2000 points over z in [-10, 10] weighted by the normal density
# (tails beyond 10 sigma weigh < 1e-22). An even count keeps the origin off the grid, where ReLU's derivative
# is ambiguous, and the symmetric grid gives E[1{z>0}] = 1/2 exactly. Gauss-Hermite nodes spread too thin
# for the large q of a chaotic net (tanh' is a spike at 0 there); the grid resolves it (tested against
# closed forms and Monte Carlo).
_NODES = np.linspace(-10.0, 10.0, 2000)
_WEIGHTS = np.exp(-_NODES**2 / 2)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()
# Bisection bracket for sigma_w^2: 0.1 is deep in the ordered phase for every activation here, 400 deep in
# the chaotic one (sigmoid's slope is 1/4, so its boundary sits near 16-20).
_SIGMA2_RANGE = (0.1, 400.0)


def _phi_and_slope(act: nn.Module | None, q: float) -> tuple[float, float]:
    """(E[phi(sqrt(q) z)^2], E[phi'(sqrt(q) z)^2]) for the activation module ``act`` (None: identity)."""
    x = torch.tensor(math.sqrt(max(q, 0.0)) * _NODES, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = x if act is None else act(x)
        (slope,) = torch.autograd.grad(y.sum(), x)
    w = torch.from_numpy(_WEIGHTS)
    return float((w * y.detach() ** 2).sum()), float((w * slope**2).sum())


def gradient_gain(act: nn.Module | None, sigma_w2: float, depth: int, q0: float = 1.0) -> float:
    """Mean-field squared gradient-norm gain through ``depth`` layers: prod of chi_l (zero biases).
    ``q0``: the mean square of the net's input entries (the first layer's pre-activation variance is
    ``sigma_w2 * q0``)."""
    q, log_gain = sigma_w2 * q0, 0.0
    for _ in range(depth):
        second, slope2 = _phi_and_slope(act, q)
        log_gain += math.log(max(sigma_w2 * slope2, 1e-300))
        q = sigma_w2 * second
    return math.exp(max(min(log_gain, 700.0), -700.0))


def critical_scale(act: nn.Module | None, depth: int, q0: float = 1.0, cap: float | None = None) -> float:
    """sigma_w^2 at which the gradient neither grows nor shrinks through ``depth`` layers (at most ``cap``)."""
    if not isinstance(depth, int) or depth < 1:
        raise bad_argument("depth", "a positive int (layers on the main path)", depth)
    lo, hi = (math.log(v) for v in _SIGMA2_RANGE)
    if gradient_gain(act, math.exp(hi), depth, q0) < 1.0:
        return math.exp(hi) if cap is None else min(cap, math.exp(hi))
    for _ in range(24):  # bisection on log sigma_w^2: 24 halvings of a range of 8.4 leave 5e-7 (relative)
        mid = (lo + hi) / 2
        if gradient_gain(act, math.exp(mid), depth, q0) < 1.0:
            lo = mid
        else:
            hi = mid
    value = math.exp((lo + hi) / 2)
    return value if cap is None else min(value, cap)




def critical_(model: nn.Module, inputs: Any = None, depth: int | None = None,
              distribution: str = "auto") -> dict[str, float]:
    """Re-draw every Linear/Conv weight at the critical scale for the activation that follows it and the
    net's depth; biases to zero. ``distribution``: ``"normal"``, ``"uniform"``, ``"orthogonal"`` or
    ``"auto"`` (orthogonal before saturating activations, normal before the rest).

    Sigmoid is a shifted, scaled tanh (sigmoid(x) = 1/2 + tanh(x/2)/2), so a sigmoid net whose layers take
    the bias ``-W 1 / 2`` (removing the 1/2 every unit passes on) *is* a tanh net in ``h/2`` with weights
    ``W/4`` (``W/2`` for the first layer): it gets 16 (4) times the tanh scale, and those biases.
    Returns {activation name: sigma_w^2 used}."""
    if distribution not in ("auto", "normal", "uniform", "orthogonal"):
        raise bad_argument("distribution", '"auto", "normal", "uniform" or "orthogonal"', distribution)
    follows = following_activations(model, inputs)
    layers = list(follows)  # forward order
    if not layers:
        return {}
    depth = depth or len(layers)
    q0 = 1.0
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        q0 = float(inputs.detach().double().pow(2).mean()) or 1.0
    scales: dict[str, float] = {}
    cache: dict[type, float] = {}
    after_sigmoid = False  # does this layer's input come out of a sigmoid?
    for layer in layers:
        act = follows[layer]
        sigmoid = isinstance(act, nn.Sigmoid)
        if act is None:
            sigma2 = 1.0  # the output layer (or a linear one): variance-preserving
        else:
            if type(act) not in cache:
                textbook = nn.init.calculate_gain(*gain_name(act)) ** 2
                if sigmoid:  # the equivalent tanh net, whose input is x/2
                    cache[type(act)] = critical_scale(nn.Tanh(), depth, q0 / 4, cap=(5 / 3) ** 2)
                elif isinstance(act, SATURATING_TYPES):  # at most the textbook gain: a shallow net needs no more
                    cache[type(act)] = critical_scale(act, depth, q0, cap=max(textbook, 1.0))
                else:
                    cache[type(act)] = critical_scale(act, depth, q0)
            sigma2 = cache[type(act)]
        if sigmoid:
            sigma2 *= 16.0 if after_sigmoid else 4.0
        elif after_sigmoid:
            sigma2 *= 4.0  # a tanh-equivalent net's weights are W/4 on h/2: a non-sigmoid consumer sees 2x
        name = type(act).__name__ if act is not None else "linear"
        scales[name] = sigma2  # the last layer before this activation: a hidden one, for sigmoid the 16x value
        saturating = isinstance(act, SATURATING_TYPES)
        kind = distribution if distribution != "auto" else "orthogonal" if saturating else "normal"
        with writable_weight(layer) as weight:
            _draw(weight, sigma2, kind)
        if layer.bias is not None:
            with torch.no_grad():
                if after_sigmoid:  # remove the 1/2 each incoming unit contributes
                    weight = layer.weight  # as the layer computes it (a parametrization may rescale the draw)
                    layer.bias.copy_(-0.5 * weight.reshape(weight.shape[0], -1).sum(1))
                else:
                    layer.bias.zero_()
        after_sigmoid = sigmoid
    return scales


@torch.no_grad()
def _draw(weight: torch.Tensor, sigma2: float, distribution: str) -> None:
    fan_in = weight[0].numel()
    std = math.sqrt(sigma2 / fan_in)
    if distribution == "normal":
        weight.normal_(0.0, std)
    elif distribution == "uniform":
        weight.uniform_(-std * math.sqrt(3), std * math.sqrt(3))
    else:
        rows = weight.shape[0]
        # semi-orthogonal: with rows <= fan_in the rows are orthonormal and each entry has variance 1/fan_in;
        # with more rows the columns are, entries have variance 1/rows, so the gain makes up the difference
        gain = math.sqrt(sigma2) * (math.sqrt(rows / fan_in) if rows > fan_in else 1.0)
        nn.init.orthogonal_(weight, gain=gain)
