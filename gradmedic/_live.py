"""Findings said while the run trains: at each flush the Monitor diagnoses its trace so far, and a finding that is
new, or worse than when it was last said, is said once: a ``GradmedicFindingWarning`` line, a text to the sink, and
the user's ``on_finding(finding)``. A finding is the same one while its kind, its first layer and the phase it was
seen in are (the layers and numbers of a growing problem change from flush to flush; saying it again at every flush
would bury it; a NaN first seen in the loss and then traced to the batch's input is news)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradmedic._errors import GradmedicFindingWarning
from gradmedic.diagnosis import SEVERITIES, Finding, Report, diagnose
from gradmedic.probes import Chunk, Probe
from gradmedic.trace import Trace

__all__ = ["LiveFindings", "ask_where_nans_come_from", "finding_key"]

# What is said live: warnings and errors. An info finding is a note for the end-of-run report, not an interruption.
SAID_FROM = "warning"


def finding_key(f: Finding) -> tuple[str, str, str]:
    """What makes a finding the same one from flush to flush (module docstring): its kind, first layer and phase."""
    return f.kind, f.layers[0] if f.layers else "", str(f.evidence.get("phase", ""))


class LiveFindings:
    """Remembers what was said; ``update(trace, step)`` says what is new or worse and returns it."""

    def __init__(self, on_finding: Callable[[Finding], Any] | None = None, warn: bool = True):
        self.on_finding = on_finding
        self.warn = warn
        self._said: dict[tuple[str, str, str], int] = {}  # (kind, first layer, phase) -> severity rank said
        self.report: Report | None = None  # the latest diagnosis
        self.history: list[tuple[int, Finding]] = []  # (the step it was said at, the finding), in order

    def update(self, trace: Trace, step: int) -> list[Finding]:
        try:
            self.report = diagnose(trace)
        finally:
            trace.release()  # the run's memory holds its trace, not a dense copy of it made for reading
        fresh = []
        for f in self.report.findings:
            key = finding_key(f)
            if f.rank < SEVERITIES.index(SAID_FROM) or self._said.get(key, -1) >= f.rank:
                continue
            self._said[key] = f.rank
            fresh.append(f)
            self.history.append((step, f))
        for f in fresh:
            if self.warn:
                warnings.warn(f"gradmedic at step {step}: {f.severity} {f.kind}: {f.message}", GradmedicFindingWarning,
                              stacklevel=4)
            if self.on_finding is not None:
                self.on_finding(f)
        return fresh


def ask_where_nans_come_from(run: Chunk, probes: Sequence[Probe], next_step: int) -> None:
    """A non-finite loss since the last flush (read on the host, where the flush brought the losses): the NaN/Inf
    probe measures ``next_step`` too, off its schedule, so that the finding names the module that makes the NaN
    without waiting for the probe's period."""
    losses = run.scalars.get("loss")
    if losses is not None and not np.all(np.isfinite(losses[1])):
        for probe in probes:
            if probe.name == "nonfinite":
                probe.also_at(next_step)
