"""Where a NaN or Inf is born: the first module whose forward, or whose backward, makes one.

Forward: hooks fire when a module *finishes*, children before their parent, so the first module in that
order with a non-finite output made it from finite inputs. Backward: a module's backward produces the
gradient with respect to its *input*, so the first input gradient (in backward order) that is not finite
names the module whose backward made it (a sqrt at 0, a division by a tiny norm).

torch.nn's parameter-free modules that cannot turn finite values into non-finite ones in either pass
(ReLU, sigmoid, pooling, dropout, containers...) are not checked: the birthplace is never one of them.

The model's own input is checked too (a forward pre-hook on the root module, its first float tensor argument): a
NaN or Inf that comes with the batch (an inf from a division by a zero std in preprocessing) is the data's, and
without this check the first module to read it would be named as its birthplace. Integer inputs (token ids) cannot
hold one; a model that embeds them makes its float input itself.

Each check is one sum kept on the device: NaN if any NaN, Inf if any Inf of one sign. +Inf meeting -Inf
in one tensor sums to NaN and is reported as "nan"; the module is right either way. A step's sums are
kept as they are (``Probe.defer``); at the flush, the first bad call of each phase of each step is picked on
the device (the least call index among the non-finite sums) and written into the buffer at that module's
row as a code: 1 NaN, 2 Inf. Nothing is read on the host until the flush turns codes into events.

Activation checkpointing recomputes a checkpointed forward inside the backward (``base.in_backward``). A
module whose forward was checked in the step is not checked again. One whose first forward ran under
``no_grad`` (reentrant checkpointing) is checked when recomputed, and its check is ordered where that first
forward ran: each forward-hook call takes a place in the step's forward order, checked or not, so the module
that made a NaN inside a checkpointed block comes before the layers after the block that only passed it on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic._tensors import first_float_tensor
from gradmedic.probes.base import Chunk, LayerIndex, Probe, in_backward, is_torch_module

__all__ = ["NonFiniteProbe"]

CODES = {1: "nan", 2: "inf"}


# torch.nn modules that map finite inputs to finite outputs, and finite output gradients to finite input
# gradients: the first non-finite value can never be born in them, so they are not checked. Containers
# return a child's output unchanged. Everything else, every user-defined module included, is checked.
_FINITE_TO_FINITE = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.GELU, nn.SiLU, nn.Softsign,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)


def _probe_sum(t: torch.Tensor) -> torch.Tensor:
    """One reduction that carries any NaN or Inf through (~8 us on 128x512; isfinite().all() ~90 us).

    Accumulated in float32 at least, so float16 values that are finite cannot overflow the sum.
    A float32 sum can only overflow when the values are themselves near 1e38, which is an explosion too.
    """
    if t.requires_grad:  # a forward output; a gradient in a backward hook has no graph (one dispatch fewer)
        t = t.detach()
    return t.sum(dtype=torch.float32) if t.dtype.itemsize < 4 else t.sum()


class NonFiniteProbe(Probe):
    name = "nonfinite"
    metrics = ("nonfinite_forward", "nonfinite_backward", "nonfinite_input")
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._seen: dict[str, tuple[list[torch.Tensor], list[int]]] = {"forward": ([], []), "backward": ([], []),
                                                                      "input": ([], [])}
        # the step's forward order: one place per forward-hook call outside a backward, checked or not
        # (a forward under no_grad too); per row, its first place; per checked forward call, its place
        self._places = 0
        self._first_place: dict[int, int] = {}
        self._order: list[int] = []
        self._checked: set[int] = set()  # rows checked outside a backward this step
        self._recomputed = False  # a check made in a recomputation this step: the calls are out of forward order

    def arm(self) -> None:
        assert self.layers is not None
        root = self.layers.modules[0]
        self._handles.append(root.register_forward_pre_hook(self.guard(self._on_input, 0), with_kwargs=True))
        for row, module in enumerate(self.layers.modules):
            if isinstance(module, _FINITE_TO_FINITE) and is_torch_module(module):
                continue
            self._handles.append(module.register_forward_hook(self.guard(self._on_forward, row)))

    def reset(self) -> None:
        super().reset()
        self._clear()

    def _clear(self) -> None:
        for codes, rows in self._seen.values():
            codes.clear()
            rows.clear()
        self._places = 0
        self._first_place.clear()
        self._order.clear()
        self._checked.clear()
        self._recomputed = False

    def _on_forward(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        codes, rows = self._seen["forward"]
        if in_backward():  # a checkpointed module recomputed: checked only if its first forward was not
            place = self._first_place.get(row)
            if place is None or row in self._checked:
                return
            self._recomputed = True
        else:
            place = self._places
            self._places += 1
            self._first_place.setdefault(row, place)
            if not torch.is_grad_enabled():  # a no_grad/inference forward is not a training step
                return
            self._checked.add(row)
        out = first_float_tensor(output)
        if out is None:
            return
        codes.append(_probe_sum(out))
        rows.append(row)
        self._order.append(place)
        x = first_float_tensor(args)
        if x is not None and x.requires_grad:
            self.on_gradient(x, self._on_grad, row)

    def _on_input(self, row: int, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The model's input, once per forward of a training step (not a recomputation, not under no_grad)."""
        if in_backward() or not torch.is_grad_enabled():
            return
        x = first_float_tensor(args)
        if x is None:
            x = first_float_tensor(tuple(kwargs.values())) if kwargs else None
        if x is not None:
            codes, rows = self._seen["input"]
            codes.append(_probe_sum(x))
            rows.append(row)

    def _on_grad(self, row: int, grad: torch.Tensor) -> None:
        codes, rows = self._seen["backward"]
        codes.append(_probe_sum(grad))
        rows.append(row)

    def collect(self, step: int) -> None:
        """Keep the step's sums (one stack); ``finish`` finds the first bad call of each phase at the flush."""
        (forward, rows_f), (backward, rows_b) = self._seen["forward"], self._seen["backward"]
        inputs, rows_i = self._seen["input"]
        if not forward and not backward and not inputs:
            return
        # the forward calls in forward order (ties, a module's repeats, by call), or () when that is the call
        # order, as it is without a recomputation: the layout stays the same from step to step, and no sort
        ranks: tuple[int, ...] = ()
        if self._recomputed:
            ranks = tuple(sorted(range(len(forward)), key=lambda i: (self._order[i], i)))
        self.defer(self.buffer.open(step), (tuple(rows_f), tuple(rows_b), tuple(rows_i), ranks),
                   torch.stack(forward + backward + inputs))
        self._clear()

    def finish(self, layout: tuple[tuple[int, ...], ...], slots: torch.Tensor, sums: torch.Tensor) -> None:
        """Both phases of every step at once: the first non-finite call of each (the least position among the bad
        ones, +inf if none; a forward call's position is its place in forward order, a backward call's its index),
        its row and its code (1 NaN, 2 Inf), written with one ``index_put_``."""
        rows_f, rows_b, rows_i, ranked = layout
        steps, calls = sums.shape  # float32 or float64 sums (_probe_sum): stack promotes
        split, end_b = len(rows_f), len(rows_f) + len(rows_b)
        if ranked:  # call index by position: put the forward calls in forward order
            sums = sums.index_select(1, self.host_tensor([*ranked, *range(split, calls)], torch.long))
            rows_f = tuple(rows_f[i] for i in ranked)
        key = torch.where(sums.isfinite(), math.inf, self.host_tensor(range(calls), sums.dtype))
        none = key.new_full((steps,), math.inf)
        first = torch.stack([key[:, a:b].amin(1) if a < b else none for a, b in ((0, split), (split, end_b),
                                                                                  (end_b, calls))], dim=1)
        hit = first.isfinite()  # (steps, 3 phases: forward, backward, input)
        pick = torch.where(hit, first, 0).long()
        code = torch.where(sums.gather(1, pick).isnan(), 1.0, 2.0)
        rows = self.host_tensor(rows_f + rows_b + rows_i, torch.long)[pick]
        col = self.buffer.col
        cols = self.host_tensor([col["nonfinite_forward"], col["nonfinite_backward"], col["nonfinite_input"]],
                                torch.long)
        # NaN where nothing was bad: "not measured", at a harmless row
        self.buffer.put_steps(slots, (rows, cols), torch.where(hit, code, math.nan))

    def flush(self) -> Chunk | None:
        self.settle()
        chunk = self.buffer.drain()
        if chunk is None:
            return None
        for j, metric in enumerate(chunk.metrics):
            phase = metric.removeprefix("nonfinite_")
            for s, li in zip(*np.nonzero(~np.isnan(chunk.values[:, :, j])), strict=True):
                code = int(chunk.values[s, li, j])
                chunk.events.append({"step": int(chunk.steps[s]), "kind": "nonfinite", "phase": phase,
                                     "module": chunk.layers[li], "value": CODES.get(code, "nan")})
        order = {"input": 0, "forward": 1, "backward": 2}  # the batch first: what a module then made of it
        chunk.events.sort(key=lambda e: (e["step"], order.get(e["phase"], 3)))
        return chunk
