"""Where a Monitor's numbers go besides its trace: ``Monitor(..., log_to=...)``.

A sink receives what a flush moved to the host, so logging adds no host sync to a training step.
Two kinds are accepted:

- a TensorBoard ``SummaryWriter`` (torch.utils.tensorboard or tensorboardX; anything with ``add_scalar``
  and ``add_text``): per-layer scalars under ``gradmedic/<metric>/<layer>``, run scalars under
  ``gradmedic/loss`` and ``gradmedic/lr``, the per-time-step curves of recurrent layers under
  ``gradmedic/time_grad_rms/<layer>/step_<s>`` (x axis: the time step), events and findings as text;
- a W&B run or its ``log`` (``log_to=wandb.log`` or ``log_to=run``): the same scalars on gradmedic's own
  step axis, ``gradmedic/step`` (``WandbSink``: W&B drops rows logged to past steps, and a flush's steps are
  past by the time it happens);
- any callable taking ``(step, metrics)``, or shaped like ``mlflow.log_metrics(metrics, step=...)``
  (called with the dict first and ``step=`` by keyword): the same scalars as one dict per step.

No framework is imported here: a writer is used through its methods only.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic.probes.base import Chunk

__all__ = ["CallableSink", "Sink", "WandbSink", "WriterSink", "as_sink", "chunk_records", "findings_text", "tag"]

PREFIX = "gradmedic"
# bookkeeping columns that are not measurements (the order layers ran in)
_NOT_LOGGED = frozenset({"forward_index"})


def tag(metric: str, layer: str = "") -> str:
    """``gradmedic/<metric>/<layer>``; the model-level row ``""`` has no layer part."""
    return f"{PREFIX}/{metric}/{layer}" if layer else f"{PREFIX}/{metric}"


def chunk_records(chunks: Iterable[Chunk]) -> dict[int, dict[str, float]]:
    """step -> {tag: value} for every finite value the chunks hold (grid metrics and run scalars)."""
    out: dict[int, dict[str, float]] = {}
    for chunk in chunks:
        for j, metric in enumerate(chunk.metrics):
            if metric in _NOT_LOGGED:
                continue
            for s, step in enumerate(chunk.steps):
                column = chunk.values[s, :, j]
                for i in np.flatnonzero(np.isfinite(column)):
                    out.setdefault(int(step), {})[tag(metric, chunk.layers[i])] = float(column[i])
        for name, (steps, values) in chunk.scalars.items():
            for step, value in zip(steps, values, strict=True):
                if math.isfinite(value):
                    out.setdefault(int(step), {})[tag(name)] = float(value)
    return dict(sorted(out.items()))


class Sink:
    """What the Monitor calls; subclasses write somewhere."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def curves(self, step: int, name: str, layer: str, values: np.ndarray) -> None:
        """One per-time-step curve (e.g. dL/dx_t of a recurrent layer at training step ``step``)."""

    def text(self, name: str, text: str, step: int) -> None:
        """Events and findings; sinks without text ignore them."""

    def flush(self) -> None:
        """Make what was written visible (a writer's file flush)."""

    def tick(self) -> None:
        """Called at every ``Monitor.step()`` (with no numbers: those come at flushes)."""

    def close(self) -> None:
        """Called once at ``Monitor.close()``, after the last flush and the findings."""
        self.flush()

    def write(self, chunks: list[Chunk]) -> None:
        for step, values in chunk_records(chunks).items():
            self.scalars(step, values)
        for chunk in chunks:
            for name, layers in chunk.series.items():
                for layer, (steps, rows) in layers.items():
                    for step, row in zip(steps, rows, strict=True):
                        self.curves(int(step), name, layer, row)
            for event in chunk.events:
                self.text("events", _event_text(event), int(event.get("step", 0)))
        self.flush()


def findings_text(findings: list[Any]) -> str:
    """Markdown (TensorBoard renders it), one paragraph per finding."""
    lines = [f"**{f.severity}** {f.kind} at {', '.join(f.layers[:4]) or 'the model'}: {f.message}" for f in findings]
    return "\n\n".join(lines) or "No findings: the gradients look healthy."


def _event_text(event: dict[str, Any]) -> str:
    if {"value", "phase", "module"} <= set(event):
        if event["phase"] == "input":
            return f"step {event['step']}: first {event['value']} in the model's input"
        return f"step {event['step']}: first {event['value']} in the {event['phase']} pass at `{event['module']}`"
    return ", ".join(f"{k}={v}" for k, v in event.items())


class WriterSink(Sink):
    """A TensorBoard ``SummaryWriter`` (or anything with its ``add_scalar``/``add_text`` methods)."""

    def __init__(self, writer: Any):
        self.writer = writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def curves(self, step: int, name: str, layer: str, values: np.ndarray) -> None:
        curve = f"{tag(name, layer)}/step_{step}"
        for t, value in enumerate(values, start=1):
            if math.isfinite(value):
                self.writer.add_scalar(curve, float(value), t)

    def text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(tag(name), text, step)

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()


class CallableSink(Sink):
    """``fn(step, metrics)``, or ``fn(metrics, step=step)`` for callables shaped like ``wandb.log`` and
    ``mlflow.log_metrics`` (a ``step`` parameter that is not the first one)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.step_by_keyword = _step_by_keyword(fn)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.step_by_keyword:
            self.fn(values, step=step)
        else:
            self.fn(step, values)


def _step_by_keyword(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: the documented (step, metrics)
        return False
    names = [p.name for p in params]
    return "step" in names and names.index("step") > 0


WANDB_STEP = f"{PREFIX}/step"


class WandbSink(Sink):
    """A W&B run: every gradmedic value on its own step axis, ``gradmedic/step``.

    Why not ``run.log(values, step=s)``: W&B keeps one history row per step and drops anything logged to a
    step below the run's current one. A flush delivers ``flush_every`` past steps at once, so with the
    user's own ``wandb.log(..., step=s)`` every gradmedic value was dropped. So the values carry their step
    as a key, ``gradmedic/*`` is plotted against it (``define_metric``), and each training step's row takes
    one flushed record (``commit=False``: it joins the row the user is writing). A row takes one record, so
    the records wait in a queue, drained one per ``Monitor.step()`` (the lag is about ``flush_every``
    steps); when nobody else commits rows (gradmedic is the only logger), the sink commits its own, at most
    one per training step. What is left at ``close()`` is written in rows of its own after the run's
    current step. The findings go to the run's summary (``gradmedic/findings``).
    """

    def __init__(self, target: Any):
        self.target = target  # a Run, its bound ``log``, or ``wandb.log`` taken before ``wandb.init()``
        self.queue: deque[dict[str, float]] = deque()
        self._run: Any = None
        self._open_row: int | None = None  # the run's step when our last record joined its open row

    def run(self) -> Any:
        if self._run is None:
            run = self.target if callable(getattr(self.target, "define_metric", None)) else None
            run = run or getattr(self.target, "__self__", None) or getattr(sys.modules.get("wandb"), "run", None)
            if run is None or not callable(getattr(run, "define_metric", None)):
                raise GradmedicError("log_to=wandb.log: no W&B run is active; call wandb.init() before training")
            run.define_metric(WANDB_STEP, hidden=True)
            run.define_metric(f"{PREFIX}/*", step_metric=WANDB_STEP)
            self._run = run
        return self._run

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.queue.append({**values, WANDB_STEP: step})

    def tick(self) -> None:
        if self.queue:
            self._put(self.queue.popleft())

    def text(self, name: str, text: str, step: int) -> None:
        if name == "findings":
            self.run().summary[tag(name)] = text

    def close(self) -> None:
        while self.queue:
            self._put(self.queue.popleft())

    def _put(self, record: dict[str, float]) -> None:
        run = self.run()
        now = getattr(run, "_local_step", None)  # the step of the run's open row, read without a round trip
        if not isinstance(now, int):  # a W&B without it: one row per record, as W&B's own docs log a metric
            run.log(record)
            return
        if now == self._open_row:  # our last record still waits in the open row: nobody committed since
            run.log({}, commit=True)
            now = run._local_step
        run.log(record, commit=False)
        self._open_row = now


def _is_wandb(log_to: Any) -> bool:
    """A W&B run, its ``log``, or ``wandb.log`` itself (checked by module name: wandb is never imported)."""
    owner = getattr(log_to, "__self__", log_to)
    return any(type(x).__module__.startswith("wandb.") or getattr(x, "__module__", None) == "wandb"
               for x in (log_to, owner))


def as_sink(log_to: Any) -> Sink | None:
    """The sink for ``Monitor(log_to=...)``; a clear error for anything else."""
    if log_to is None or isinstance(log_to, Sink):
        return log_to
    if _is_wandb(log_to) and (callable(log_to) or callable(getattr(log_to, "log", None))):
        return WandbSink(log_to)
    if callable(getattr(log_to, "add_scalar", None)) and callable(getattr(log_to, "add_text", None)):
        return WriterSink(log_to)
    if callable(log_to):
        return CallableSink(log_to)
    raise bad_argument("log_to", "a TensorBoard SummaryWriter, a W&B run or wandb.log, a callable (step, metrics), "
                       "or None",
                       log_to)
