"""What a probe writes into between flushes (a StepBuffer on the device, one row per step) and what it hands to the
trace at a flush (a Chunk of host arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Chunk", "StepBuffer", "buffer_dtype", "to_device"]


@dataclass
class Chunk:
    """What a probe hands to the trace at a flush: host arrays, nothing that holds a graph."""

    steps: np.ndarray  # (S,) int64
    layers: list[str]
    metrics: list[str]
    values: np.ndarray  # (S, L, M) float64, NaN where not measured
    # series[name][layer] = (steps (S,), values (S, T)); e.g. per-time-step gradients
    series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # scalars[name] = (steps (S,), values (S,)): run-level numbers recorded at every step (loss, lr),
    # kept apart from the grid so that a long run does not make the grid dense
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host numbers on ``device``. On CUDA through pinned memory with ``non_blocking``: an
    asynchronous copy queued on the stream, where ``torch.tensor(..., device="cuda")`` copies from pageable
    memory and makes the host wait for the stream. Only a layout not seen before gets here (a model whose
    shapes change at every step: variable sequence lengths); torch's pinned allocator keeps the host buffer
    until the copy has run. Any failure to pin (a locked-memory limit) falls back to the plain copy."""
    if device.type == "cuda":
        try:
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
        except RuntimeError:
            pass
    return torch.tensor(values, dtype=dtype, device=device)


def buffer_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (so float64 models keep their precision), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


class StepBuffer:
    """A preallocated (capacity, rows, metrics) tensor on the device; NaN means not measured."""

    def __init__(self, capacity: int, rows: Sequence[str], metrics: Sequence[str], device: torch.device,
                 dtype: torch.dtype):
        self.rows = list(rows)
        self.metrics = list(metrics)
        self.col = {m: j for j, m in enumerate(self.metrics)}
        self.values = torch.full((capacity, len(self.rows), len(self.metrics)), float("nan"),
                                 device=device, dtype=dtype)
        self.steps: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.values.shape[0]

    def open(self, step: int) -> int:
        """The slot for ``step`` (the same slot when several probes write the same step)."""
        if self.steps and self.steps[-1] == step:
            return len(self.steps) - 1
        if self.full:
            raise RuntimeError("StepBuffer is full; the Monitor flushes before this can happen")
        self.steps.append(step)
        return len(self.steps) - 1

    def write(self, slot: int, rows: torch.Tensor, metric: str, values: torch.Tensor) -> None:
        self.values[slot, :, self.col[metric]].index_copy_(0, rows, values.to(self.values.dtype))

    def write_columns(self, slot: int, rows: torch.Tensor, metrics: Sequence[str],
                      values: Sequence[torch.Tensor]) -> None:
        """Several metrics of the same rows in one copy; ``metrics`` must be adjacent columns, in order."""
        first = self.col[metrics[0]]
        if [self.col[m] for m in metrics] != list(range(first, first + len(metrics))):
            raise ValueError(f"write_columns needs adjacent metrics in column order, got {list(metrics)}")
        block = torch.stack([v.to(self.values.dtype) for v in values], dim=1)
        self.values[slot, :, first:first + len(metrics)].index_copy_(0, rows, block)

    def put_steps(self, slots: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor) -> None:
        """Values at arbitrary (row, column) cells of several slots in one kernel: ``values`` is (slots, K);
        ``where`` holds (K,) rows and columns shared by every slot (``Probe.cells``), or (slots, K) ones per slot."""
        rows, cols = where
        self.values.index_put_((slots.view(-1, 1), rows, cols), values.to(self.values.dtype))

    def drain(self) -> Chunk | None:
        """Copy the filled slots to the host (one transfer) and reset."""
        if not self.steps:
            return None
        n = len(self.steps)
        host = self.values[:n].cpu().numpy().astype(np.float64, copy=True)
        self.values[:n].fill_(float("nan"))
        steps = np.asarray(self.steps, dtype=np.int64)
        self.steps = []
        measured = ~np.all(np.isnan(host), axis=(0, 2))
        keep = np.flatnonzero(measured)
        return Chunk(steps=steps, layers=[self.rows[i] for i in keep], metrics=list(self.metrics),
                     values=host[:, keep, :])
