"""Two or more saved runs on one page: ``gradmedic report A.gmtrace B.gmtrace ... -o compare.html``.

A practitioner's question is "what changed between the run that trained and the one that did not", so the page
opens with the findings that differ between the runs (a kind found in some runs and not others, or at another
severity), then one line per run (loss first and last, verdict), then the per-layer gradient profiles and the
loss curves of every run on shared axes; the findings all runs share come last.

Runs of the same model share their layer names: the profile is drawn against them. Runs of different models
(a deeper variant) are drawn against relative depth (first layer 0, last 1), since no name matches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError
from gradmedic.diagnosis import diagnose
from gradmedic.report import plots
from gradmedic.report.html import Page, write_page
from gradmedic.trace import Trace

__all__ = ["compare_files", "compare_page", "differences"]

_WHERE = 3  # layer names shown per finding in a cell; the rest are counted


def _labels(paths: Sequence[Path]) -> list[str]:
    """File names; with the parent folder where two runs share a name (run1/gradmedic.gmtrace, run2/...)."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def differences(reports: Sequence[Any]) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
    """(differing, shared): per finding kind, the finding of each run (None where that run has none). A kind
    differs when some run lacks it or the severities differ; differing kinds come worst first."""
    kinds: dict[str, list[Any]] = {}
    for i, report in enumerate(reports):
        for finding in report.findings:
            row = kinds.setdefault(finding.kind, [None] * len(reports))
            if row[i] is None or finding.rank > row[i].rank:
                row[i] = finding
    differing, shared = [], []
    for kind, row in kinds.items():
        same = all(f is not None for f in row) and len({f.severity for f in row}) == 1
        (shared if same else differing).append((kind, row))
    differing.sort(key=lambda kr: -max(f.rank for f in kr[1] if f is not None))
    return differing, shared


def _cell(finding: Any) -> str:
    if finding is None:
        return "not found"
    where = ", ".join(x or "(model)" for x in finding.layers[:_WHERE])
    more = f" and {len(finding.layers) - _WHERE} more" if len(finding.layers) > _WHERE else ""
    return f"{finding.severity.upper()} at {where}{more}: {finding.message}" if where else \
        f"{finding.severity.upper()}: {finding.message}"


def _loss_span(trace: Any) -> str:
    if "loss" not in trace.scalar_names:
        return ""
    steps, loss = trace.scalar("loss")
    return f"{loss[0]:.4g} -> {loss[-1]:.4g}" if len(loss) else ""


def _metric(traces: Sequence[Any]) -> tuple[str | None, str]:
    for metric, quantity in (("grad_norm", "|dL/dW|"), ("backward_norm", "|dL/d output|")):
        if all(metric in t.metrics for t in traces):
            return metric, quantity
    return None, ""


def compare_page(labels: Sequence[str], traces: Sequence[Any], reports: Sequence[Any],
                 title: str = "gradmedic: runs compared") -> Page:
    """The page for runs ``labels`` (their traces and diagnoses, in the same order)."""
    page = Page(title)
    differing, shared = differences(reports)
    page.heading("Findings that differ")
    if differing:
        page.table(("kind", *labels), [(kind, *(_cell(f) for f in row)) for kind, row in differing],
                   [max((f for f in row if f is not None), key=lambda f: f.rank).severity for _, row in differing])
    else:
        page.paragraph("None: every run has the same findings at the same severity.")
    page.heading("Runs")
    page.table(("run", "model", "layers", "measured steps", "loss first -> last", "verdict"),
               [(label, t.meta.get("model", "?"), len(t.layers), len(t.steps), _loss_span(t),
                 "healthy" if r.healthy else f"not healthy ({r.worst()})")
                for label, t, r in zip(labels, traces, reports, strict=True)],
               ["healthy" if r.healthy else r.worst() for r in reports])
    page.heading("Figures")
    metric, quantity = _metric(traces)
    if metric is not None:
        page.figure(plots.run_profiles(dict(zip(labels, (t.last(metric) for t in traces), strict=True)),
                                       quantity=quantity), "per-layer gradient of each run")
    curves = {label: tuple(map(list, t.scalar("loss"))) for label, t in zip(labels, traces, strict=True)
              if "loss" in t.scalar_names}
    if curves:
        page.figure(plots.loss_curves(curves, title="Training loss of each run"), "loss curves")
    if shared:
        page.heading("Findings every run shares")
        page.table(("kind", *labels), [(kind, *(_cell(f) for f in row)) for kind, row in shared],
                   [row[0].severity for _, row in shared])
    return page


def compare_files(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Load each trace, diagnose it, write the comparison page; a ``GradmedicError`` names a file that is not
    a trace."""
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise GradmedicError(f"no such file: {f} (give two or more .gmtrace files to compare)")
        with f.open("rb") as handle:
            if not handle.read(2) == b"PK":
                raise GradmedicError(f"{f} is not a trace (.gmtrace); only traces can be compared")
    traces = [Trace.load(f) for f in files]
    reports = [diagnose(t) for t in traces]
    return write_page(compare_page(_labels(files), traces, reports), output)
