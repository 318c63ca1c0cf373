"""Signal propagation: per-layer forward gain and backward gain, the init-time view of gradient flow.

forward gain  = RMS(output) / RMS(input)          of each parameterised layer
backward gain = RMS(dL/d input) / RMS(dL/d output)

A product of backward gains far below 1 over depth is vanishing, far above 1 exploding (Saxe et al.
2014; Schoenholz et al. 2017 call the per-layer mean squared gain chi). The forward gain says why:
a layer that shrinks or blows up its input usually does the same to gradients. A layer whose input
does not require a gradient (the first one) has no backward gain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic._tensors import first_float_tensor, sum_of_squares
from gradmedic.probes.base import LayerIndex, Probe

__all__ = ["SignalProbe"]




class SignalProbe(Probe):
    name = "signal"
    metrics = ("forward_gain", "backward_gain")
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._rows = layers.rows_owning_params()
        # per quantity: list of (row, norm tensor, element count); quantities: in, out, grad_in, grad_out
        self._parts: dict[str, list[tuple[int, torch.Tensor, int]]] = {k: [] for k in ("in", "out", "gin", "gout")}

    def arm(self) -> None:
        assert self.layers is not None
        for row in self._rows:
            module = self.layers.modules[row]
            self._handles.append(module.register_forward_hook(self.guard(self._on_forward, row)))

    def reset(self) -> None:
        super().reset()
        for parts in self._parts.values():
            parts.clear()

    def _on_forward(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        x, y = first_float_tensor(args), first_float_tensor(output)
        if x is None or y is None:
            return
        self._parts["in"].append((row, sum_of_squares(x), x.numel()))
        self._parts["out"].append((row, sum_of_squares(y), y.numel()))
        if x.requires_grad and y.requires_grad:
            self.on_gradient(x, self._on_grad, "gin", row)
            self.on_gradient(y, self._on_grad, "gout", row)

    def _on_grad(self, key: str, row: int, grad: torch.Tensor) -> None:
        self._parts[key].append((row, sum_of_squares(grad), grad.numel()))

    def _rms(self, key: str) -> torch.Tensor:
        """Per-row RMS (NaN where not seen) over all calls."""
        size = len(self.layers) if self.layers is not None else 0
        out = torch.full((size,), float("nan"), dtype=self.dtype, device=self.device)
        parts = self._parts[key]
        if not parts:
            return out
        rows = self.host_tensor([r for r, _, _ in parts], torch.long)
        sq = torch.zeros(size, dtype=self.dtype, device=self.device)
        sq.index_add_(0, rows, torch.stack([n.to(self.dtype) for _, n, _ in parts]))
        counts = [0.0] * size
        for r, _, k in parts:
            counts[r] += k
        seen = self.host_tensor(sorted({r for r, _, _ in parts}), torch.long)
        den = self.host_tensor(counts, self.dtype)
        out.index_copy_(0, seen, (sq / den.clamp_min(1)).sqrt().index_select(0, seen))
        return out

    def collect(self, step: int) -> None:
        if not self._parts["out"]:
            return
        slot = self.buffer.open(step)
        rows = self.host_tensor(self._rows, torch.long)
        forward = (self._rms("out") / self._rms("in")).index_select(0, rows)
        backward = (self._rms("gin") / self._rms("gout")).index_select(0, rows)
        self.buffer.write_columns(slot, rows, ("forward_gain", "backward_gain"), (forward, backward))
        for parts in self._parts.values():
            parts.clear()
