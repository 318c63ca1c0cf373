"""The loss sentinel: a sudden failure (a NaN loss, a loss spike, a loss that diverges) is named at the step it happens,
not at the next flush (issue 26: "at or before the failure on sudden spikes and NaN").

The Monitor hands every step's loss to ``Sentinel.see``. When the loss series reaches a state in which the rule of
that kind would say a warning or an error, it returns True and the Monitor flushes and diagnoses right then (its
ordinary ``flush()`` and live-findings path), so the finding is said at that step, and a NaN loss asks the NaN/Inf
probe for the next step. The conditions are the rules' own, computed incrementally on the host values:

- ``nonfinite``: the loss is NaN or infinite (the rule ``nonfinite`` reports the first such step);
- ``loss_spike``: a spike by the rule's SPIKE_* constants that has held SPIKE_CONFIRM steps (when the rule's finding
  becomes a warning; a single bad batch that comes back is information and said at the end, not live);
- ``divergence``: the smoothed loss above the rule's DIVERGE_WARNING line for DIVERGE_HOLD steps (a warning) or its
  DIVERGE_ERROR line for DIVERGE_LOST steps (an error), by the rule's definition of start, best and smoothing.

Each fires once per episode: a run of steps during which its condition holds (a divergence fires once at its warning
and once more if it becomes an error, the two things the live path says). The diagnosis at the flush stays the
authority: the sentinel only decides when to look. ``tests/test_sentinel.py`` checks its decisions against the rules
run on the trace cut at every step.

Reading the loss costs no sync. A Python float (a Hugging Face Trainer's loss) is read at once. A CPU tensor is copied
into a host slot (a memcpy: on the CPU the loss already is host memory). A CUDA tensor is copied into a slot of a
pinned host ring with ``non_blocking=True`` and an event recorded behind it; later steps read the slots whose event
says the copy is done, so its value arrives a step or two late and the step never waits. A loss that finds every slot
still in flight is skipped by the sentinel (the trace still records it, read at the flush). Host slots are read
through a NumPy view made when the slots are made: a read of host memory, not a device-to-host copy. Other devices
(MPS, XLA) are not watched: their losses are read at the flush, as before.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradmedic.diagnosis.rules.training import (
    DIVERGE_ERROR,
    DIVERGE_HOLD,
    DIVERGE_LOST,
    DIVERGE_WARNING,
    RECOVER_SIGMA,
    SMOOTH,
    SPIKE_CONFIRM,
    SPIKE_MIN_HISTORY,
    SPIKE_MIN_RISE,
    SPIKE_SIGMA,
    SPIKE_WINDOW,
)

__all__ = ["LossReader", "Sentinel"]

# Slots of the pinned ring: a copy recorded at step s is normally done by step s + 1 (the loss is the last thing the
# step computed before backward); four leave room for a step that outruns the device by three steps (a host that
# enqueues ahead) before a value is skipped.
RING = 4


class LossReader:
    """Host values of the losses handed to ``put``, in step order, without a sync. ``new_event``: makes an object with
    ``record()`` and ``query()`` (``torch.cuda.Event`` on CUDA; a test hands in its own); ``deferred=True`` sends CPU
    tensors through the ring as well (the ring's logic tested without a GPU)."""

    def __init__(self, new_event: Callable[[], Any] | None = None, deferred: bool = False, slots: int = RING):
        self._new_event = new_event
        self._deferred = deferred
        self._slots = slots
        self._cpu = torch.zeros(1, dtype=torch.float64)
        self._cpu_view = self._cpu.numpy()  # made once: later reads are of host memory
        self._ring: torch.Tensor | None = None  # the host slots of the ring, pinned for CUDA; made on first use
        self._ring_view: np.ndarray | None = None
        self._events: list[Any] = []
        self._free: deque[int] = deque()
        self._pending: deque[tuple[int, int | None, float]] = deque()  # (step, slot or None, value when slot is None)
        self.skipped = 0  # losses that found every slot in flight

    def put(self, step: int, loss: torch.Tensor | float | None) -> list[tuple[int, float]]:
        """Take this step's loss (None: nothing new) and return every (step, value) now readable, oldest first."""
        if isinstance(loss, torch.Tensor):
            self._take_tensor(step, loss.detach())
        elif loss is not None:
            self._pending.append((step, None, float(loss)))
        return self._ready()

    def _take_tensor(self, step: int, loss: torch.Tensor) -> None:
        if loss.numel() == 0:
            return
        first = loss.reshape(-1)[:1]  # a loss per sample: its first entry, as the run scalars record
        if first.device.type == "cpu" and not self._deferred:
            self._cpu.copy_(first)
            self._pending.append((step, None, float(self._cpu_view[0])))
            return
        if first.device.type not in ("cuda", "cpu"):
            return  # not watched (see the module's docstring)
        if self._ring is None:
            self._make_ring(first.device)
        if not self._free:
            self.skipped += 1
            return
        slot = self._free.popleft()
        # on the device first (a kernel), then one async copy into pinned memory; the event marks its end
        self._ring[slot:slot + 1].copy_(first.to(torch.float64), non_blocking=True)
        self._events[slot].record()
        self._pending.append((step, slot, math.nan))

    def _make_ring(self, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._ring = torch.zeros(self._slots, dtype=torch.float64, pin_memory=pinned)
        self._ring_view = self._ring.numpy()
        new_event = self._new_event or torch.cuda.Event
        self._events = [new_event() for _ in range(self._slots)]
        self._free = deque(range(self._slots))

    def _ready(self) -> list[tuple[int, float]]:
        out = []
        while self._pending:
            step, slot, value = self._pending[0]
            if slot is not None:
                if not self._events[slot].query():
                    break  # in order: a later value waits behind it
                value = float(self._ring_view[slot])
                self._free.append(slot)
            self._pending.popleft()
            out.append((step, value))
        return out


class _Spike:
    """The rule loss_spike's warning, one value at a time: a value SPIKE_SIGMA standard deviations and SPIKE_MIN_RISE
    above the mean of the finite values among the SPIKE_WINDOW before it (SPIKE_MIN_HISTORY of them at least) starts
    a spike, which is over once a later value is back within RECOVER_SIGMA of that mean; one that has held
    SPIKE_CONFIRM steps is a warning."""

    def __init__(self) -> None:
        self._window: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._nonfinite = 0  # in the window: while none is, the window is summed as it is (the common case, faster)
        self._was_spike = False
        self._band: float | None = None  # the latest spike's way back, while it is not back
        self._held = 0
        self._said = False

    def see(self, value: float) -> bool:
        window = self._window
        finite = window if not self._nonfinite else [x for x in window if math.isfinite(x)]
        spike = False
        if len(finite) >= SPIKE_MIN_HISTORY and math.isfinite(value):
            n = len(finite)
            mean = sum(finite) / n
            sd = math.sqrt(max(sum(map(operator.mul, finite, finite)) / n - mean * mean, 0.0))  # the rule's formula
            spike = sd > 0 and (value - mean) / sd >= SPIKE_SIGMA and value - mean >= SPIKE_MIN_RISE * abs(mean)
        if len(window) == window.maxlen and not math.isfinite(window[0]):
            self._nonfinite -= 1  # leaves the window as the new value comes in
        self._nonfinite += not math.isfinite(value)
        window.append(value)
        alarm = False
        if spike and not self._was_spike:  # the first step of a run of spikes: the rule's latest spike
            self._band, self._held, self._said = mean + RECOVER_SIGMA * sd, 1, False
        elif self._band is not None:
            if math.isfinite(value) and value <= self._band:
                self._band = None  # back: information, not said live
            else:
                self._held += 1
        if self._band is not None and self._held >= SPIKE_CONFIRM and not self._said:
            self._said = alarm = True
        self._was_spike = spike
        return alarm


class _Divergence:
    """The rule divergence's finding, one value at a time: the median of the last SMOOTH values (a NaN counts as +inf)
    above its line (from the start, the median of the first SMOOTH finite values, and the best smoothed value so far)
    for DIVERGE_HOLD steps (warning) or DIVERGE_LOST steps above the error line (error)."""

    LEVELS = ((DIVERGE_WARNING, DIVERGE_HOLD), (DIVERGE_ERROR, DIVERGE_LOST))  # by rising severity

    def __init__(self) -> None:
        self._last: deque[float] = deque(maxlen=SMOOTH)
        self._first: list[float] = []
        self._start: float | None = None
        self._best = math.nan
        self._waiting: list[tuple[float, float]] = []  # (smoothed, best) of steps before the start is known
        self._held = [0, 0]
        self._said = -1  # the highest level said in this episode

    def see(self, value: float) -> bool:
        self._last.append(math.inf if math.isnan(value) else value)
        if math.isfinite(value) and len(self._first) < SMOOTH:
            self._first.append(value)
        smooth = statistics.median(self._last) if len(self._last) == SMOOTH else math.nan
        if math.isfinite(smooth) and not smooth >= self._best:  # np.fmin.accumulate: a NaN best is replaced
            self._best = smooth
        if self._start is None:
            self._waiting.append((smooth, self._best))
            if len(self._first) < SMOOTH:
                return False  # the rule needs SMOOTH finite values
            self._start = statistics.median(self._first)
            for s, b in self._waiting:  # the rule's line at those steps uses the start known only now
                self._count(s, b)
            self._waiting = []
        else:
            self._count(smooth, self._best)
        level = next((k for k in (1, 0) if self._held[k] >= self.LEVELS[k][1]), None)
        if level is None or not math.isfinite(self._best):
            self._said = -1  # the rule says nothing at this step: the episode is over
            return False
        if level > self._said:
            self._said = level
            return True
        return False

    def _count(self, smooth: float, best: float) -> None:
        start = self._start
        for k, ((given_back, factor), _) in enumerate(self.LEVELS):
            line = max(best + given_back * (start - best), factor * best) if best < start else factor * start
            self._held[k] = self._held[k] + 1 if smooth > line else 0


class Sentinel:
    """Watches the loss at every step; ``see(step, loss)`` is True when the Monitor should flush and diagnose now.
    ``alarms``: (the step of the value, the kind) of every firing. ``warn``: the Monitor's one-warning reporter; a
    failure switches the sentinel off (findings then wait for the next flush), never the user's step."""

    def __init__(self, warn: Callable[..., None], reader: LossReader | None = None):
        self._warn = warn
        self._reader = reader or LossReader()
        self._spike = _Spike()
        self._divergence = _Divergence()
        self._was_finite = True
        self._off = False
        self.alarms: list[tuple[int, str]] = []

    def see(self, step: int, loss: torch.Tensor | float | None) -> bool:
        if self._off:
            return False
        try:
            fired = False
            for at, value in self._reader.put(step, loss):
                fired |= self._judge(at, value)
            return fired
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._off = True
            self._warn("sentinel", error, what="watching the loss at every step", consequence="sudden failures are "
                       "said at the next flush")
            return False

    def _judge(self, step: int, value: float) -> bool:
        kinds = []
        finite = math.isfinite(value)
        if not finite and self._was_finite:
            kinds.append("nonfinite")
        self._was_finite = finite
        if self._spike.see(value):
            kinds.append("loss_spike")
        if self._divergence.see(value):
            kinds.append("divergence")
        self.alarms += [(step, kind) for kind in kinds]
        return bool(kinds)
