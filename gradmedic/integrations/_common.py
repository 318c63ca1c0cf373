"""What the Trainer callbacks share: pre-clip gradient capture at the end of backward, the run's
diagnosis at the end (printed, trace saved, optional HTML report), and sinks on the trainer's step axis."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmedic._sinks import Sink, as_sink
from gradmedic.report import report_page, write_page

__all__ = ["EndOfBackward", "OffsetSink", "finish_run"]

TRACE_NAME = "gradmedic.gmtrace"
REPORT_NAME = "gradmedic-report.html"


class EndOfBackward:
    """Calls ``fn`` once at the end of every backward pass through ``model``'s parameters.

    Per-parameter post-accumulate-grad hooks fire as each ``.grad`` is written; the first one of a pass
    queues ``fn`` on the autograd engine, which runs it when the whole backward is done: after every
    gradient is accumulated, before anything (clipping, an optimizer) can touch them. ``arm()`` and
    ``disarm()`` add and remove the hooks, so that unmeasured steps run with none.
    """

    def __init__(self, model: nn.Module, fn: Callable[[], None]):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fn = fn
        self.handles: list[Any] = []
        self.queued = False

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def arm(self) -> None:
        if not self.handles:
            self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def disarm(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.queued = False

    @torch.compiler.disable
    def _on_grad(self, param: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._done)

    def _done(self) -> None:
        self.queued = False
        self.fn()


class OffsetSink(Sink):
    """A sink whose step axis is the trainer's (its global step is the Monitor's step + ``offset``)."""

    def __init__(self, inner: Sink, offset: int):
        self.inner, self.offset = inner, offset

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.inner.scalars(step + self.offset, values)

    def curves(self, step: int, name: str, layer: str, values: Any) -> None:
        self.inner.curves(step + self.offset, name, layer, values)

    def text(self, name: str, text: str, step: int) -> None:
        self.inner.text(name, text, step + self.offset)

    def flush(self) -> None:
        self.inner.flush()


def offset_sink(log_to: Any, offset: int) -> Sink | None:
    sink = as_sink(log_to)
    return OffsetSink(sink, offset) if sink is not None else None


def finish_run(monitor: Any, output_dir: str | os.PathLike | None, report: bool, verbose: bool) -> Any:
    """Close the monitor, diagnose the run, print the findings, save the trace (and the HTML report)."""
    monitor.close()
    result = monitor.diagnose()
    if output_dir is not None:
        out = Path(output_dir)
        monitor.trace.save(out / TRACE_NAME)
        if report:

            write_page(report_page(result, title="gradmedic report of the training run"), out / REPORT_NAME)
    if verbose:
        print(str(result), end="")
        if output_dir is not None:
            print(f"gradmedic: trace saved to {Path(output_dir) / TRACE_NAME}"
                  + (f", report {Path(output_dir) / REPORT_NAME}" if report else ""))
    return result
