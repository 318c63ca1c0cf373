"""Per-layer activation statistics: mean, std, saturated fraction, dead fraction.

Saturation (sigmoid/tanh/hardtanh/softsign/hardsigmoid family) is measured per element: the share of
outputs where the activation's derivative, computed from the output, is below SATURATED_DERIVATIVE of
its peak. Death (ReLU family) is measured per unit: a unit (feature/channel) is dead when its output is
zero for every sample and position in the batch, so no gradient reaches its incoming weights.

The feature axis is 1 for (B, C) and for channels-first conv maps (B, C, H, W), and the last axis for
(B, T, C) sequences. A 3-d tensor is ambiguous, so the layout is taken from the last parameterised
layer that ran before the activation: conv and batch-norm layers are channels-first, the rest
(Linear, LayerNorm, RNN, Embedding) channels-last.

A module called several times per forward accumulates over its calls; each call counts its own units,
since one activation module reused after two different layers is two sets of units. Functional
activations (``F.relu``, ``torch.sigmoid``, ``x.tanh()``) are seen through a ``TorchFunctionMode``
active only during a scheduled forward, and are booked under the module whose ``forward`` called them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradmedic._tensors import first_float_tensor
from gradmedic.probes.base import LayerIndex, Probe

__all__ = ["SATURATED_DERIVATIVE", "ActivationProbe", "activation_family"]

# A unit passes on less than 1/20 of the gradient it would in its linear region once its derivative
# falls below 5% of the peak (tanh: |y| > 0.975; sigmoid: y < 0.0127 or y > 0.987). Ten such layers in
# a row cut the gradient by 1e-13, which is the regime Glorot & Bengio (2010) describe for sigmoid nets.
SATURATED_DERIVATIVE = 0.05


@dataclass(frozen=True)
class Family:
    name: str
    saturated: Callable[[torch.Tensor], torch.Tensor] | None  # output -> bool mask of saturated elements
    dies: bool  # has a zero region with zero gradient (ReLU family)


def _bounds(lo: float, hi: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: (y <= lo) | (y >= hi)


SIGMOID = Family("sigmoid", lambda y: y * (1 - y) < 0.25 * SATURATED_DERIVATIVE, False)
TANH = Family("tanh", lambda y: 1 - y * y < SATURATED_DERIVATIVE, False)
SOFTSIGN = Family("softsign", lambda y: (1 - y.abs()).square() < SATURATED_DERIVATIVE, False)
HARDSIGMOID = Family("hardsigmoid", _bounds(0.0, 1.0), False)
RELU = Family("relu", None, True)
RELU6 = Family("relu6", lambda y: y >= 6.0, True)
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
    if isinstance(module, _OTHER_TYPES):
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

_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                   nn.LocalResponseNorm)


class _FunctionalWatch(TorchFunctionMode):
    """Reports calls of known activation functions to the probe; passes everything through."""

    def __init__(self, on_call: Callable[[Family, Any], None]):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        family = _FUNCTIONAL.get(func)
        if family is not None:
            self.on_call(family if isinstance(family, Family) else family(args, kwargs), out)
        return out


class ActivationProbe(Probe):
    name = "activations"
    metrics = ("act_mean", "act_std", "saturated_frac", "dead_frac")
    uses_hooks = True

    def __init__(self, every: int = 1, functional: bool = True):
        super().__init__(every)
        self.functional = functional

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._family = [activation_family(m) for m in layers.modules]
        n = len(layers)
        self._acc = torch.zeros(4, n, dtype=self.dtype, device=self.device)  # mean, m2, saturated, dead
        self._n = [0] * n  # elements seen per row
        self._sat_n = [0] * n  # elements of saturating calls
        self._units = [0] * n  # units of dying calls
        self._stack: list[nn.Module] = []
        self._channels_first = False
        self._watch: _FunctionalWatch | None = None

    def arm(self) -> None:
        assert self.layers is not None
        for row, module in enumerate(self.layers.modules):
            family = self._family[row]
            if family is not None:
                self._handles.append(module.register_forward_hook(self.guard(self._on_module, row, family)))
            if self.functional or self.layers.owns_params[row]:
                self._handles.append(module.register_forward_pre_hook(self.guard(self._enter, module)))
                self._handles.append(
                    module.register_forward_hook(self.guard(self._leave, module), always_call=True))

    def disarm(self) -> None:
        super().disarm()
        self._stop_watch()
        self._stack.clear()
        self._acc.zero_()
        n = len(self._n)
        self._n, self._sat_n, self._units = [0] * n, [0] * n, [0] * n

    # --- module stack (for functional attribution and the layout of the last layer) --------------
    def _enter(self, module: nn.Module, _module: nn.Module, args: Any) -> None:
        if self.functional and not self._stack and self._watch is None:
            self._watch = _FunctionalWatch(self.guard(self._on_functional))
            self._watch.__enter__()
        self._stack.append(module)

    def _leave(self, module: nn.Module, _module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        assert self.layers is not None
        row = self.layers.row[id(module)]
        if self._family[row] is None and self.layers.owns_params[row]:
            self._channels_first = isinstance(module, _CHANNELS_FIRST)
        if not self._stack:
            self._stop_watch()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.__exit__(None, None, None)

    # --- measurement ------------------------------------------------------------------------------
    def _on_module(self, row: int, family: Family, module: nn.Module, args: Any, output: Any) -> None:
        out = first_float_tensor(output)
        if out is not None:
            self._measure(row, family, out)

    def _on_functional(self, family: Family, output: Any) -> None:
        if not self._stack or self.layers is None:
            return
        top = self._stack[-1]
        row = self.layers.row.get(id(top))
        if row is None or self._family[row] is not None:  # inside nn.ReLU etc.: already measured
            return
        out = first_float_tensor(output)
        if out is not None:
            self._measure(row, family, out)

    @torch.no_grad()
    def _measure(self, row: int, family: Family, y: torch.Tensor) -> None:
        y = y.detach()
        if y.dtype.itemsize < 4:
            y = y.float()
        n = y.numel()
        if n == 0:
            return
        var, mean = torch.var_mean(y, correction=0)
        mean, var = mean.to(self.dtype), var.to(self.dtype)
        seen = self._n[row]
        if seen == 0:
            self._acc[0, row] = mean
            self._acc[1, row] = var * n
        else:  # Chan et al.'s parallel merge of (n, mean, M2)
            total = seen + n
            delta = mean - self._acc[0, row]
            self._acc[0, row] += delta * (n / total)
            self._acc[1, row] += var * n + delta.square() * (seen * n / total)
        self._n[row] = seen + n
        if family.saturated is not None:
            self._acc[2, row] += family.saturated(y).sum()
            self._sat_n[row] += n
        if family.dies and y.dim() >= 2:
            axis = 1 if (y.dim() == 2 or self._channels_first) else y.dim() - 1
            others = tuple(d for d in range(y.dim()) if d != axis)
            units = y.shape[axis]
            alive = y.amax(dim=others) > 0
            self._acc[3, row] += units - alive.sum()
            self._units[row] += units

    def collect(self, step: int) -> None:
        seen = [r for r, n in enumerate(self._n) if n]
        if not seen:
            return
        slot = self.buffer.open(step)
        rows = torch.tensor(seen, dtype=torch.long, device=self.device)
        acc = self._acc.index_select(1, rows)
        n = torch.tensor([float(self._n[r]) for r in seen], dtype=self.dtype, device=self.device)
        self.buffer.write(slot, rows, "act_mean", acc[0])
        self.buffer.write(slot, rows, "act_std", (acc[1] / n).clamp_min(0).sqrt())
        sat = [(i, r) for i, r in enumerate(seen) if self._sat_n[r]]
        if sat:
            idx = torch.tensor([i for i, _ in sat], dtype=torch.long, device=self.device)
            den = torch.tensor([float(self._sat_n[r]) for _, r in sat], dtype=self.dtype, device=self.device)
            self.buffer.write(slot, rows.index_select(0, idx), "saturated_frac", acc[2].index_select(0, idx) / den)
        dead = [(i, r) for i, r in enumerate(seen) if self._units[r]]
        if dead:
            idx = torch.tensor([i for i, _ in dead], dtype=torch.long, device=self.device)
            den = torch.tensor([float(self._units[r]) for _, r in dead], dtype=self.dtype, device=self.device)
            self.buffer.write(slot, rows.index_select(0, idx), "dead_frac", acc[3].index_select(0, idx) / den)
        self._acc.zero_()
        k = len(self._n)
        self._n, self._sat_n, self._units = [0] * k, [0] * k, [0] * k
