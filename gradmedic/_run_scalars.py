"""The run's scalars: the loss and the learning rate of every step the Monitor sees, kept apart from the probes'
per-layer grid (a long run would otherwise make the grid dense) and read to the host at each flush."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradmedic.probes.buffer import Chunk

__all__ = ["SCALARS", "RunScalars"]

# the run scalars by column: what ``Trace.scalar`` holds. ``loss_scale``: a GradScaler's scale after its update at each
# step (the Monitor's ``scaler=``), read by the rule loss_scale_collapse
SCALARS = ("loss", "lr", "loss_scale")


class RunScalars:
    """(step, column, value) with the value a Python number, or a device tensor (the loss, detached) read at the
    flush. ``warn(key, error, what=..., consequence=...)`` is the Monitor's one-warning-per-kind reporter: a value
    that cannot be recorded or read costs that value and a warning, never the user's step."""

    def __init__(self, warn: Callable[..., None]):
        self._warn = warn
        self._host: list[tuple[int, int, float]] = []
        self._device: list[tuple[int, int, torch.Tensor]] = []

    def record(self, step: int, loss: torch.Tensor | float | None, optimizer: Any, scaler: Any = None) -> None:
        """Loss and learning rate of this step. A tensor (the loss; a learning rate kept as a tensor) is copied on
        the device, its first entry only, and read at the flush with the others (one copy per device): a copy, since
        the user's tensor may change in place after the step (a loss accumulator zeroed, a scheduler's ``fill_``
        of a tensor learning rate, a CUDA graph's output). A Python number stays on the host: writing it into a
        device buffer would be a blocking host-to-device copy per step on CUDA."""
        try:
            lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
            for col, value in enumerate((loss, lr, _scale_of(scaler))):
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                    if value.numel() == 1:
                        self._device.append((step, col, value.clone()))
                    elif value.numel():  # a loss per sample: its first entry, as before; an empty one has none
                        self._device.append((step, col, value.reshape(-1)[:1].clone()))
                elif value is not None:
                    self._host.append((step, col, float(value)))
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._warn("run", error, what="recording the loss and learning rate", consequence="that value was dropped")

    def drain(self) -> Chunk | None:
        """Everything recorded since the last drain, as a Chunk of scalars (None when nothing was)."""
        host, self._host = self._host, []
        kept, self._device = self._device, []
        by_device: dict[torch.device, list[tuple[int, int, torch.Tensor]]] = {}
        for entry in kept:
            by_device.setdefault(entry[2].device, []).append(entry)
        for entries in by_device.values():  # one copy to the host per device; cat promotes mixed dtypes
            try:
                values = torch.cat([t.reshape(1) for _, _, t in entries]).cpu().tolist()
                host += [(s, col, float(v)) for (s, col, _), v in zip(entries, values, strict=True)]
            except Exception as error:  # noqa: BLE001 - the other devices' values and the host numbers stay
                self._warn("run read", error, what="reading the loss and learning rate at the flush",
                           consequence="the values kept on that device were dropped")
        scalars = {}
        for j, name in enumerate(SCALARS):
            # a loss that is NaN or infinite is kept: it is the first sign of a run gone bad (the nonfinite rule)
            pairs = sorted((s, v) for s, col, v in host if col == j)
            if pairs:
                scalars[name] = (np.asarray([s for s, _ in pairs], dtype=np.int64),
                                 np.asarray([v for _, v in pairs], dtype=np.float64))
        if not scalars:
            return None
        return Chunk(steps=np.zeros(0, dtype=np.int64), layers=[], metrics=[], values=np.zeros((0, 0, 0)),
                     scalars=scalars)


def _scale_of(scaler: Any) -> torch.Tensor | float | None:
    """A GradScaler's current scale, as its device tensor (``get_scale()`` would read it to the host: a sync per step
    on CUDA); None without a scaler or when it is disabled."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale
    return scaler.get_scale() if hasattr(scaler, "get_scale") else None
