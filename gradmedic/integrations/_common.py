"""What the Trainer callbacks share: pre-clip gradient capture at the end of backward, the run's
diagnosis at the end (printed, trace saved, optional HTML report), and sinks on the trainer's step axis."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError
from gradmedic._progress import progress
from gradmedic._sinks import Sink, as_sink
from gradmedic.report import report_page, write_page

__all__ = ["EndOfBackward", "OffsetSink", "finish_run"]

TRACE_NAME = "gradmedic.gmtrace"
REPORT_NAME = "gradmedic-report.html"
TABLE_NAME = "gradmedic.txt"  # the per-layer table and the findings, as print(report) shows them


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

    def tick(self) -> None:
        self.inner.tick()

    def close(self) -> None:
        self.inner.close()


def offset_sink(log_to: Any, offset: int) -> Sink | None:
    sink = as_sink(log_to)
    return OffsetSink(sink, offset) if sink is not None else None


def _write_report(result: Any, path: Path) -> bool:
    """The HTML report; without matplotlib one line says so, and the end of training goes on (was a traceback)."""

    try:
        write_page(report_page(result, title="gradmedic report of the training run"), path)
    except GradmedicError as error:
        print(f"gradmedic: no HTML report: {error}")
        return False
    return True


def finish_run(monitor: Any, output_dir: str | os.PathLike | None, report: bool, verbose: bool) -> Any:
    """Close the monitor, diagnose the run, save the trace, the per-layer table (and the HTML report), print the
    verdict and the findings. The table is not printed: on a large model it ran to hundreds of rows with the
    verdict on its last line; it is in ``gradmedic.txt`` and the report. A bar says what is happening while it
    takes time (the Trainer's own bar has finished by then)."""
    with progress("gradmedic: flushing the last measurements") as bar:
        monitor.close()
        bar.describe("gradmedic: diagnosing the run")
        result = monitor.diagnose()
        if output_dir is not None:
            out = Path(output_dir)
            bar.describe("gradmedic: saving the trace")
            monitor.trace.save(out / TRACE_NAME)
            (out / TABLE_NAME).write_text(str(result), encoding="utf-8")
            if report:
                report = _write_report(result, out / REPORT_NAME)
    if verbose:
        from gradmedic._rich import Console  # rich on first use: `import gradmedic` stays light

        console = Console()
        console.print()  # off the line the Trainer's progress bar ended on
        result.render(console, table=False)
        if output_dir is not None:
            out = Path(output_dir)
            console.print(f"gradmedic: trace saved to {out / TRACE_NAME}, per-layer table in {out / TABLE_NAME}"
                          + (f", report {out / REPORT_NAME}" if report else f" (gradmedic report {out / TRACE_NAME} "
                             "-o report.html for the figures)"), markup=False, highlight=False, soft_wrap=True)
    return result
