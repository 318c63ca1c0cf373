"""What the Trainer callbacks share: pre-clip gradient capture at the end of backward, the run's
diagnosis at the end (printed, trace saved, optional HTML report), and sinks on the trainer's step axis."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic._live import finding_key
from gradmedic._progress import progress
from gradmedic._sinks import Sink, as_sink
from gradmedic.diagnosis import SEVERITIES
from gradmedic.report import report_page, write_page

__all__ = ["EndOfBackward", "OffsetSink", "finish_run"]

TRACE_NAME = "gradmedic.gmtrace"
REPORT_NAME = "gradmedic-report.html"
TABLE_NAME = "gradmedic.txt"  # the per-layer table and the findings, as print(report) shows them


class StopSwitch:
    """The callbacks' ``stop_on``: the Monitor's ``on_finding`` trips it when a finding said live is at least that
    severe, and the callback stops training through the framework's own control (``should_training_stop``,
    ``trainer.should_stop``). A user's own ``on_finding`` is called too."""

    LEVELS = ("warning", "error")

    def __init__(self, stop_on: str | None, on_finding: Callable[[Any], Any] | None = None):
        if stop_on is not None and stop_on not in self.LEVELS:
            raise bad_argument("stop_on", f"None or one of {self.LEVELS}", stop_on)
        if on_finding is not None and not callable(on_finding):
            raise bad_argument("on_finding", "a callable taking a Finding, or None", on_finding)
        self.stop_on = stop_on
        self.user = on_finding
        self.tripped: Any = None  # the finding that stopped the run
        self._said = False

    def __call__(self, finding: Any) -> None:
        if self.user is not None:
            self.user(finding)
        if self.stop_on is not None and self.tripped is None and \
                SEVERITIES.index(finding.severity) >= SEVERITIES.index(self.stop_on):
            self.tripped = finding

    def reset(self) -> None:
        """A new run (a second ``trainer.train()``): nothing has stopped it yet."""
        self.tripped = None
        self._said = False

    def stopping(self, step: int) -> bool:
        """Whether the callback should stop the run now; the first time, one line on stderr says so and why, since
        the framework's own last line ("max_epochs reached", or nothing) would not."""
        if self.tripped is None:
            return False
        if not self._said:
            self._said = True
            f = self.tripped
            print(f"gradmedic: stopping training after step {step} (stop_on={self.stop_on!r}): {f.severity} "
                  f"{f.kind}: {f.message.splitlines()[0] if f.message else ''}", file=sys.stderr)
        return True


# A run shorter than this many steps is measured more often than the default preset would: the callbacks know
# max_steps, and the default periods (gradients every 20 steps, activations every 100, a flush every 100) gave a
# 30-step run 2 points per layer and its findings 55-100 steps after a failure (issue 26).
SHORT_RUN = 2000
# Measurements a short run gets at least, spread evenly over it; and findings said at least this many times.
SHORT_RUN_POINTS = 40
SHORT_RUN_FLUSHES = 10


def cadence(max_steps: int | None, monitor_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Monitor's arguments for a run of ``max_steps``: what the user gave stays; a short run with the default
    schedule gets every probe at least SHORT_RUN_POINTS times and SHORT_RUN_FLUSHES flushes (live findings)."""
    kwargs = dict(monitor_kwargs)
    if not max_steps or max_steps <= 0 or max_steps >= SHORT_RUN:
        return kwargs
    if "every" not in kwargs and "probes" not in kwargs and kwargs.get("preset", "standard") == "standard":
        kwargs["every"] = max(1, max_steps // SHORT_RUN_POINTS)
    kwargs.setdefault("flush_every", max(1, min(100, max_steps // SHORT_RUN_FLUSHES)))
    return kwargs


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


def said_and_gone(said: list, findings: list) -> list[str]:
    """One line per finding said while the run trained that the end's diagnosis no longer holds at that severity
    or worse (a spike the run got over, a hot lr's first steps): the end reads the state at the end, and a user who
    reads only it should still learn what was said, and when."""
    now = {finding_key(f): SEVERITIES.index(f.severity) for f in findings}
    lines = []
    for step, f in said:
        if now.get(finding_key(f), -1) < SEVERITIES.index(f.severity):
            lines.append(f"gradmedic: said at step {step}, not so at the end: {f.severity} {f.kind}: "
                         f"{f.message.splitlines()[0] if f.message else ''}")
    return lines


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
        for line in said_and_gone(monitor.said, result.findings):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if output_dir is not None:
            out = Path(output_dir)
            console.print(f"gradmedic: trace saved to {out / TRACE_NAME}, per-layer table in {out / TABLE_NAME}"
                          + (f", report {out / REPORT_NAME}" if report else f" (gradmedic report {out / TRACE_NAME} "
                             "-o report.html for the figures)"), markup=False, highlight=False, soft_wrap=True)
    return result
