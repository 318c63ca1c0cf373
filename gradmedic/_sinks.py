"""Where a Monitor's numbers go besides its trace: ``Monitor(..., log_to=...)``.

A sink receives what a flush moved to the host, so logging adds no host sync to a training step.
Two kinds are accepted:

- a TensorBoard ``SummaryWriter`` (torch.utils.tensorboard or tensorboardX; anything with ``add_scalar``
  and ``add_text``): per-layer scalars under ``gradmedic/<metric>/<layer>``, run scalars under
  ``gradmedic/loss`` and ``gradmedic/lr``, the per-time-step curves of recurrent layers under
  ``gradmedic/time_grad_rms/<layer>/step_<s>`` (x axis: the time step), events and findings as text;
- any callable taking ``(step, metrics)``, or shaped like ``wandb.log(data, step=...)`` and
  ``mlflow.log_metrics(metrics, step=...)`` (called with the dict first and ``step=`` by keyword): the
  same scalars as one dict per step.

No framework is imported here: a writer is used through its methods only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from gradmedic._errors import bad_argument
from gradmedic.probes.base import Chunk

__all__ = ["CallableSink", "Sink", "WriterSink", "as_sink", "chunk_records", "findings_text", "tag"]

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


def as_sink(log_to: Any) -> Sink | None:
    """The sink for ``Monitor(log_to=...)``; a clear error for anything else."""
    if log_to is None or isinstance(log_to, Sink):
        return log_to
    if callable(getattr(log_to, "add_scalar", None)) and callable(getattr(log_to, "add_text", None)):
        return WriterSink(log_to)
    if callable(log_to):
        return CallableSink(log_to)
    raise bad_argument("log_to", "a TensorBoard SummaryWriter, a callable (step, metrics) such as wandb.log, or None",
                       log_to)
