"""Finding, Report and KINDS: what diagnosis hands to a person (and to ``treat``)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gradmedic._display import html_of
from gradmedic._terminal import printable
from gradmedic.diagnosis.catalog import REMEDIES
from gradmedic.diagnosis.context import Context
from gradmedic.trace import Trace

__all__ = ["KINDS", "SEVERITIES", "Finding", "Report", "first_remedy", "register_first_remedy"]

KINDS: tuple[str, ...] = (
    "vanishing_gradients",
    "exploding_gradients",
    "saturated_units",
    "dead_units",
    "nonfinite",
    "vanishing_through_time",
    "exploding_through_time",
    "gradient_underflow",
    "stalled_updates",
    "no_gradient",
    "untested_dynamics",
    # while it trains (issue 26): the loss and the total gradient norm, the output logits, the optimizer's state
    "loss_spike",
    "divergence",
    "loss_stall",
    "output_logit_drift",
    "adam_epsilon",
    "update_too_large",
    "loss_scale_collapse",
    "attention_logit_growth",
)

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One problem: what, how bad, where (earliest layer first), the numbers, and what to do."""

    kind: str
    severity: str
    layers: list[str]
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Finding.kind should be one of {KINDS}, but given {self.kind!r}.")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity should be one of {SEVERITIES}, but given {self.severity!r}.")
        unknown = [r for r in self.remedies if r not in REMEDIES]
        if unknown:
            raise ValueError(f"Finding.remedies should be ids from REMEDIES, but given {unknown}.")

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def __repr__(self) -> str:
        """One screen at most: a finding's evidence can hold hundreds of numbers (``.evidence`` has them all)."""
        message = self.message if len(self.message) <= 100 else self.message[:99] + "…"
        return (f"Finding(severity={self.severity!r}, kind={self.kind!r}, layers=[{_few(self.layers)}], "
                f"remedies={self.remedies[:4]!r}, message={message!r})")

    def _repr_html_(self) -> str:
        return html_of(self)  # drawn by the report stage (gradmedic.report.notebook registers it)


# How the first remedy of a finding is chosen: registered by the remedies stage (gradmedic.remedies.order, imported
# by ``import gradmedic``), which knows the actions ``treat`` can carry out and the order it tries them in. The
# choice is handed down, not fetched up (as ``_display`` does for drawings): the diagnosis names no higher stage.
_CHOOSERS: list[Callable[[Finding, Report | None], tuple[str | None, str]]] = []


def register_first_remedy(choose: Callable[[Finding, Report | None], tuple[str | None, str]]) -> None:
    """``choose(finding, report) -> (remedy id or None, why it comes first)``: the one choice every view shows."""
    _CHOOSERS[:] = [choose]


def first_remedy(finding: Finding, report: Report | None = None) -> tuple[str | None, str]:
    """The remedy to try first for ``finding``, and why (the diagnosis's top-ranked one until the remedies stage
    registers its choice)."""
    if _CHOOSERS:
        return _CHOOSERS[0](finding, report)
    return (finding.remedies[0], "the diagnosis's top-ranked remedy") if finding.remedies else (None, "")


class Report:
    """The findings about one model or run, worst first, with the trace they were read from."""

    def __init__(self, findings: list[Finding], trace: Trace | None = None,
                 context: Context | dict[str, Any] | None = None):
        self.findings = sorted(findings, key=lambda f: (-f.rank, KINDS.index(f.kind)))
        self.trace = trace
        self.context = Context.of(context)

    @property
    def healthy(self) -> bool:
        """True when no finding is a warning or an error."""
        return all(f.severity == "info" for f in self.findings)

    def worst(self) -> str | None:
        """The highest severity present, or None."""
        return self.findings[0].severity if self.findings else None

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"healthy": self.healthy, "findings": [self._finding_dict(f) for f in self.findings],
                               "context": _jsonable(self.context.to_dict())}
        if self.trace is not None:
            doc["layers"] = _layer_rows(self.trace)
        return doc

    def _finding_dict(self, finding: Finding) -> dict[str, Any]:
        first, why = first_remedy(finding, self)
        return {**finding.to_dict(), "first_remedy": first, "why_first": why}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    # --- display --------------------------------------------------------------------------------
    def table(self):
        """A rich Table: one row per layer with the numbers the rules read and the findings there."""
        from gradmedic._rich import Table, Text  # rich on first use: `import gradmedic` stays light

        table = Table(title_justify="left")
        for header in ("layer", "type", "backward signal", "grad/weight", "saturated", "dead", "finding"):
            # a layer name is folded onto more lines on a narrow terminal, never cut short
            table.add_column(header, justify="left" if header in ("layer", "type", "finding") else "right",
                             overflow="fold" if header == "layer" else "ellipsis")
        where: dict[str, list[str]] = {}
        for f in self.findings:
            for layer in f.layers:
                where.setdefault(layer, []).append(f.kind)
        for row in _layer_rows(self.trace) if self.trace is not None else []:
            cells = [_fmt(row.get("backward_norm")), _fmt(row.get("grad_to_weight")),
                     _pct(row.get("saturated_frac")), _pct(row.get("dead_frac"))]
            # names come from the user's code: Text, never markup ("[/]" or "[red]" in a name is data)
            table.add_row(Text(printable(row["layer"], newlines=False) or "(model)"),
                          Text(printable(row["type"], newlines=False)), *cells,
                          ", ".join(where.get(row["layer"], [])))
        return table

    def render(self, console=None, fit_table: bool = False, table: bool = True) -> None:
        """Print the table and the findings with their remedies (to ``console`` or stdout). ``fit_table``: the table
        as wide as its rows need (whole layer names on one line), the findings at the console's width.
        ``table=False``: the verdict first, then the findings, no table (the end of a training run: a 32-layer
        Llama's table is 330 rows, and the verdict under it scrolled out of sight)."""
        from gradmedic._rich import Console, Text  # rich on first use: `import gradmedic` stays light

        console = console or Console()
        verdict = "healthy" if self.healthy else f"not healthy ({self.worst()})"
        if not table:
            console.print(f"[bold]gradmedic: {verdict}[/]: {len(self.findings)} finding(s)")
        if self.trace is not None and table:
            table = self.table()
            width = console.width
            if fit_table:
                from gradmedic._rich import Measurement  # rich on first use: `import gradmedic` stays light

                unbounded = console.options.update_width(10_000)  # measured without the console's own limit
                console.width = max(width, Measurement.get(console, unbounded, table).maximum)
            try:
                console.print(table)
            finally:
                console.width = width
        if not self.findings and table:
            console.print("[green]No findings: gradients flow.[/]")
        colour = {"info": "cyan", "warning": "yellow", "error": "red"}
        for f in self.findings:
            # a message names layers, which come from the user's code or a file: control characters escaped
            console.print(Text.assemble((f.severity.upper(), colour[f.severity]), printable(f" {f.kind}: {f.message}")))
            first, why = first_remedy(f, self)
            if first is not None:
                console.print(Text(f"    first: {first} ({REMEDIES[first].description}); why first: {why}"))
                others = [r for r in f.remedies if r != first][:3]
                if others:
                    console.print(Text(f"    else: {', '.join(others)}"))
        if table:
            console.print(f"[bold]{verdict}[/]: {len(self.findings)} finding(s)")

    def __str__(self) -> str:
        from gradmedic._rich import Console  # rich on first use: `import gradmedic` stays light

        # text goes to a log, a file or a notebook, not to a terminal of known width: the table keeps whole layer
        # names on their lines (a GPT-2 name folded at 120 columns read "...attention.output.LayerN" / "orm")
        console = Console(file=io.StringIO(), width=120, color_system=None)
        self.render(console, fit_table=True)
        return console.file.getvalue()

    def __repr__(self) -> str:
        kinds = _few([f"{f.severity}:{f.kind}" for f in self.findings], 6)
        return f"Report(healthy={self.healthy}, findings=[{kinds}])"

    def _repr_html_(self) -> str:
        """Jupyter: the report page inline (verdict, findings with what to do, figures, the folded layer table)."""
        return html_of(self)  # drawn by the report stage (gradmedic.report.notebook registers it)


def _few(items: list[str], shown: int = 4) -> str:
    """``a, b, c, d and 5 more``: a list in a repr that fits a line."""
    head = ", ".join(x or "(model)" for x in items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


_ROW_METRICS = ("backward_norm", "backward_rms", "grad_norm", "grad_to_weight", "update_to_weight",
                "saturated_frac", "dead_frac", "forward_gain", "backward_gain", "time_grad_ratio", "grad_zero_frac")


def _layer_rows(trace: Trace) -> list[dict[str, Any]]:
    types = trace.meta.get("types", {})
    last = {m: trace.last(m) for m in _ROW_METRICS}
    rows = []
    for layer in trace.layers:
        row: dict[str, Any] = {"layer": layer, "type": types.get(layer, "")}
        for m in _ROW_METRICS:
            value = last[m].get(layer)
            if value is not None and math.isfinite(value):
                row[m] = value
        if len(row) > 2:
            rows.append(row)
    return rows


def _jsonable(obj: Any) -> Any:
    """Plain JSON: NaN/Inf become strings, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"
