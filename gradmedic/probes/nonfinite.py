"""Where a NaN or Inf is born: the first module whose output (forward) or output gradient (backward) holds one.

Forward hooks fire when a module *finishes*, children before their parent, so the first module in that
order with a non-finite output is the innermost one that produced it from finite inputs. In the
backward, tensor hooks on outputs fire in backward order; the first output whose gradient is
non-finite names the place where the backward broke (the cause is in the backward of what consumed
that output).

Each check is one reduction kept on the device (max |x|: NaN if any NaN, Inf if any Inf and no NaN).
The first bad call is picked with an ``argmax`` on the device and written into the buffer at that
module's row as a code: 1 NaN, 2 Inf. Nothing is read on the host until the flush turns codes into
events.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic._tensors import first_float_tensor
from gradmedic.probes.base import Chunk, LayerIndex, Probe

__all__ = ["NonFiniteProbe"]

CODES = {1: "nan", 2: "inf"}


def _code(t: torch.Tensor) -> torch.Tensor:
    peak = torch.linalg.vector_norm(t.detach(), ord=float("inf"))
    return peak.isnan().to(torch.int8) + 2 * (peak.isinf().to(torch.int8))


class NonFiniteProbe(Probe):
    name = "nonfinite"
    metrics = ("nonfinite_forward", "nonfinite_backward")
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._seen: dict[str, tuple[list[torch.Tensor], list[int]]] = {"forward": ([], []), "backward": ([], [])}
        self._generation = 0
        self._row_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def arm(self) -> None:
        assert self.layers is not None
        for row, module in enumerate(self.layers.modules):
            self._handles.append(module.register_forward_hook(self.guard(self._on_forward, row)))

    def disarm(self) -> None:
        super().disarm()
        self._generation += 1
        for codes, rows in self._seen.values():
            codes.clear()
            rows.clear()

    def _on_forward(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        out = first_float_tensor(output)
        if out is None:
            return
        codes, rows = self._seen["forward"]
        codes.append(_code(out))
        rows.append(row)
        if out.requires_grad:
            out.register_hook(self.guard(self._on_grad, row, self._generation))

    def _on_grad(self, row: int, generation: int, grad: torch.Tensor) -> None:
        if generation != self._generation:
            return
        codes, rows = self._seen["backward"]
        codes.append(_code(grad))
        rows.append(row)

    def _rows_tensor(self, rows: list[int]) -> torch.Tensor:
        key = tuple(rows)
        cached = self._row_cache.get(key)
        if cached is None:
            if len(self._row_cache) > 64:
                self._row_cache.clear()
            cached = self._row_cache[key] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return cached

    def collect(self, step: int) -> None:
        if not any(codes for codes, _ in self._seen.values()):
            return
        slot = self.buffer.open(step)
        for phase, (codes, rows) in self._seen.items():
            if not codes:
                continue
            stacked = torch.stack(codes)
            bad = stacked > 0
            first = torch.argmax(bad.to(torch.int8))  # the first maximum: the earliest bad call
            row = self._rows_tensor(rows).index_select(0, first.reshape(1))
            code = stacked.index_select(0, first.reshape(1)).to(self.dtype)
            value = torch.where(bad.any(), code, torch.full_like(code, float("nan")))
            self.buffer.write(slot, row, f"nonfinite_{phase}", value)
            codes.clear()
            rows.clear()

    def flush(self) -> Chunk | None:
        chunk = self.buffer.drain()
        if chunk is None:
            return None
        for j, metric in enumerate(chunk.metrics):
            phase = metric.removeprefix("nonfinite_")
            for s, li in zip(*np.nonzero(~np.isnan(chunk.values[:, :, j])), strict=True):
                code = int(chunk.values[s, li, j])
                chunk.events.append({"step": int(chunk.steps[s]), "kind": "nonfinite", "phase": phase,
                                     "module": chunk.layers[li], "value": CODES.get(code, "nan")})
        chunk.events.sort(key=lambda e: (e["step"], e["phase"] != "forward"))
        return chunk
