"""The three report pages: a lab suite (claims, per-experiment tables and figures), and a diagnosis
``Report`` (from ``check`` or a Monitor trace: findings, per-layer numbers, gradient-flow figures)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from gradmedic.architecture import block_index
from gradmedic.diagnosis import REMEDIES, first_remedy
from gradmedic.lab.claims import fmt, group_results, judge
from gradmedic.lab.depth_table import DEPTH_EXPERIMENT, INIT_EXPERIMENT, depth_cells, depth_figure
from gradmedic.lab.rows import check_report_rows
from gradmedic.lab.suites import SUITES
from gradmedic.report import plots
from gradmedic.report.html import Page

__all__ = ["report_page", "suite_page"]


def _num(value: Any) -> str:
    return fmt(value) if isinstance(value, (int, float)) or value is None else str(value)


def _median_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float | None]]:
    steps = runs[0]["curve"]["steps"]
    stacked = np.array([[np.nan if v is None else v for v in r["curve"]["loss"]] for r in runs], dtype=float)
    with warnings.catch_warnings():  # a step where every seed had diverged is an all-NaN column
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(stacked, axis=0)
    return steps, [None if math.isnan(v) else float(v) for v in med]


def suite_page(suite_name: str, rows: list[tuple[dict[str, Any], dict[str, Any]]],
               description: str = "", wall_s: float | None = None) -> Page:
    """A lab suite: the claims table, then one section per experiment."""
    check_report_rows(rows)  # a row from elsewhere is one line naming it, not a traceback from a figure
    page = Page(f"gradmedic lab: {suite_name}")
    if description:
        page.paragraph(description)
    seeds = sorted({c["seed"] for c, _ in rows})
    page.paragraph(f"{len(rows)} runs, seeds {seeds}" + (f", {wall_s:.0f} s of run time in all" if wall_s else "")
                   + ". Losses are the mean of the last 10% of training steps; 'ratio' is the first layer's "
                   "gradient norm over the last layer's.", muted=True)
    grouped = group_results(rows)
    suite = SUITES.get(suite_name)
    verdicts = judge(grouped, suite.tests_claims if suite else True)
    page.heading("Claims")
    page.table(("claim", "experiment", "verdict", "measured"),
               [(v.claim, v.experiment, v.summary, v.evidence) for v in verdicts],
               [v.verdict.replace(" ", "-") for v in verdicts])
    for name, by_label in grouped.items():
        experiment = suite.experiment(name) if suite else None
        page.heading(experiment.title if experiment else name)
        table = []
        for label, runs in by_label.items():
            r = runs[0]
            table.append((label, len(runs), _num(_med(runs, "final_loss")), _num(_med(runs, "test_acc")),
                          _num(_med(runs, "steps_to_target")), _num(_med(runs, "ratio_init")),
                          _num(_med(runs, "ratio_trained")), _num(r["baseline"]), f"{_med(runs, 'wall_s'):.1f}"))
        page.table(("run", "seeds", "final loss", "test acc", "steps to target", "ratio at init",
                    "ratio trained", "baseline", "wall s"), table)
        curves = {label: _median_curve(runs) for label, runs in by_label.items()}
        baseline = next(iter(by_label.values()))[0]["baseline"]
        page.figure(plots.loss_curves(curves, baseline, title=f"{name}: training loss"), f"{name} loss curves")
        if name == DEPTH_EXPERIMENT:  # the stream's gradient against depth, as `gradmedic lab publish` draws it
            page.figure(depth_figure(depth_cells(rows), depth_cells(rows, INIT_EXPERIMENT)),
                        f"{name}: stream gradient against depth")
        if experiment is not None and experiment.kind == "time":
            _time_figures(page, name, by_label)
        else:
            _layer_figures(page, name, by_label)
    return page


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r.get(key) for r in runs if r.get(key) is not None]
    return float(np.median(values)) if values else None


def _layer_figures(page: Page, name: str, by_label: dict[str, list[dict[str, Any]]]) -> None:
    grads = {label: runs[0]["gradients"] for label, runs in by_label.items() if runs[0]["gradients"]["grad_norm"]}
    if not grads:
        return
    # bars need one layer axis: group runs whose layers are the same as the first one's
    first = next(iter(grads.values()))["layers"]
    same = {label: g["grad_norm"][0] for label, g in grads.items() if g["layers"] == first}
    page.figure(plots.layer_bars(first, same, title=f"{name}: per-layer gradient at init"),
                f"{name} per-layer gradient bars")
    label, g = next(iter(grads.items()))
    page.figure(plots.gradient_heatmap(g["steps"], g["layers"], np.array(g["grad_norm"], dtype=float),
                                       title=f"{name} / {label}: gradient flow over training"),
                f"{name} gradient heatmap")


def _time_figures(page: Page, name: str, by_label: dict[str, list[dict[str, Any]]]) -> None:
    longest = max((len(runs[0]["time"].get("init") or []) for runs in by_label.values()), default=0)
    curves = {label: runs[0]["time"]["init"] for label, runs in by_label.items()
              if runs[0]["time"] and len(runs[0]["time"]["init"]) == longest}
    if curves:
        page.figure(plots.time_curves(curves, title=f"{name}: dL/dx_t at init, T={longest}"),
                    f"{name} gradient through time")


def report_page(report, title: str = "gradmedic report", figures: bool = True) -> Page:
    """A diagnosis Report (from gm.check or gm.diagnose(trace)): findings first, then the figures, then the
    per-layer table folded away (a 48-block transformer has some 340 rows). ``figures=False``: no matplotlib
    needed."""
    page = Page(title)
    trace = report.trace
    if trace is not None:
        model = trace.meta.get("model", "model")
        # a check's trace says preset "custom" (its own probes): that word is jargon to the reader, so it is left out
        preset = trace.meta.get("preset", "?")
        page.paragraph(f"{model}: {len(trace.layers)} modules, {len(trace.steps)} recorded step(s), "
                       + (f"preset {preset}, " if preset != "custom" else "")
                       + f"dtype {trace.meta.get('dtype', '?')}.", muted=True)
    page.heading("Findings")
    if not report.findings:
        page.paragraph("No findings: the gradients look healthy.")
    else:
        page.table(("severity", "kind", "where", "what was found", "what to do"),
                   [(f.severity, f.kind, _where(f.layers), f.message, _action(f, report)) for f in report.findings],
                   [f.severity for f in report.findings])
    if trace is None:
        return page
    if figures:
        trace_figures(page, trace)
    layer_rows = report.to_dict().get("layers", [])
    if layer_rows:
        columns = [c for c in ("backward_norm", "grad_norm", "grad_to_weight", "saturated_frac", "dead_frac")
                   if any(c in r for r in layer_rows)]
        page.heading("Per layer (last recorded step)")
        shown = layer_rows[:TABLE_ROWS]
        page.table(("layer", "type", *columns),
                   [(r["layer"], r["type"], *(_num(r.get(c)) for c in columns)) for r in shown],
                   folded=f"{len(layer_rows)} layers: show the table")
        if len(layer_rows) > len(shown):
            left = len(layer_rows) - len(shown)
            page.paragraph(f"The first {len(shown)} of {len(layer_rows)} layers are shown ({left} left out); "
                           "Trace.to_csv() writes every one.", muted=True)
    return page


_WHERE = 4  # layer names shown per finding; the rest are counted


def _where(layers: list[str]) -> str:
    shown = ", ".join(x or "(model)" for x in layers[:_WHERE])
    return shown + (f" and {len(layers) - _WHERE} more" if len(layers) > _WHERE else "")


def _action(finding, report) -> str:
    """The one first remedy (``gradmedic.diagnosis.first_remedy``: what ``gm.treat`` tries first, what the terminal
    and the JSON name) as an instruction with why it is first, then the other ids to try."""
    first, why = first_remedy(finding, report)
    if first is None:
        return "No remedy applies: what was found says what to look for."  # no_gradient: a cut or an unused layer
    description = REMEDIES[first].description
    text = f"{description[:1].upper()}{description[1:]} ({first}; first because {why})."
    others = [rid for rid in finding.remedies if rid != first][:3]
    return text + (f" Else try: {', '.join(others)}." if others else "")


_MAX_BARS = 60  # beyond this many layers a bar per layer is a comb: the per-role profile reads better
# What a page can show, and so what a report draws, whatever the trace declares (a 0.94 MiB trace of 50,000 layers took
# 54-184 s and 800 MiB: one matplotlib bar each). A 7.5-inch figure at 90 dpi is 675 px wide: 200 bars of 3 px.
DRAWN_BARS = 200
DRAWN_LINES = 20  # lines in one figure: a legend of more is unreadable, and the markers and colours repeat at 10
TABLE_ROWS = 2000  # rows of the folded per-layer table; Trace.to_csv() has every layer
_NOT_PROFILED = frozenset({"block", "activation", "embedding", "other"})


def role_lines(trace, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Last recorded ``metric`` of each layer inside a repeated block (a ``block`` in the architecture
    table's roles), one line per role and position in the block (``h.*.attn.c_attn``):
    label -> (block indices, values). Empty for a model without repeated blocks."""
    roles = trace.meta.get("roles", {})
    groups: dict[tuple[str, str], dict[int, float]] = {}
    for layer, value in trace.last(metric).items():
        index, role = block_index(layer), roles.get(layer)
        if index is None or role is None or role in _NOT_PROFILED:
            continue
        parts = layer.split(".")
        at = max(i for i, p in enumerate(parts) if p.isdigit())
        prefix, rest = ".".join(parts[:at]), ".".join(parts[at + 1:])
        if not rest or roles.get(".".join(parts[:at + 1])) != "block":
            continue  # not inside a residual block (a plain Sequential's layers are numbered too)
        groups.setdefault((prefix, f"{rest} ({role})"), {})[index] = value
    groups = {key: by_block for key, by_block in groups.items() if len(by_block) >= 2}
    stacks = {prefix for prefix, _ in groups}
    lines = {}
    for (prefix, label), by_block in groups.items():
        blocks = sorted(by_block)
        lines[f"{prefix}: {label}" if len(stacks) > 1 else label] = (blocks, [by_block[b] for b in blocks])
    return lines


def _bars_drawn(values: np.ndarray) -> np.ndarray:
    """Indices of the layers given a bar: all of them up to DRAWN_BARS; beyond, evenly spaced through the depth, with
    the smallest and the largest positive value always among them (where a vanishing or an explosion shows)."""
    n = len(values)
    if n <= DRAWN_BARS:
        return np.arange(n)
    picked = set(np.linspace(0, n - 1, DRAWN_BARS - 2).round().astype(int).tolist())
    positive = np.where(values > 0, values, np.nan)
    if np.isfinite(positive).any():
        picked |= {int(np.nanargmin(positive)), int(np.nanargmax(positive))}
    return np.asarray(sorted(picked))


def trace_figures(page: Page, trace) -> None:
    """The figures of one trace (the report page's, and a notebook's display of a Trace)."""
    page.heading("Figures")
    metric = "grad_norm" if "grad_norm" in trace.metrics else "backward_norm" if "backward_norm" in trace.metrics \
        else None
    quantity = "|dL/dW|" if metric == "grad_norm" else "|dL/d output|"
    if metric is not None:
        lines = role_lines(trace, metric)
        if len(lines) > DRAWN_LINES:
            page.paragraph(f"{len(lines)} roles across blocks: the first {DRAWN_LINES} are drawn "
                           f"({len(lines) - DRAWN_LINES} left out).", muted=True)
            lines = dict(list(lines.items())[:DRAWN_LINES])
        if lines:
            page.figure(plots.role_profile(lines, title="Gradient per role across blocks, last recorded step",
                                           quantity=quantity), "per-role depth profile")
        values = trace.metric(metric)
        keep_cols = ~np.all(np.isnan(values), axis=0)
        keep_rows = ~np.all(np.isnan(values), axis=1)
        layers = [name for name, k in zip(trace.layers, keep_cols, strict=True) if k]
        values = values[keep_rows][:, keep_cols]
        steps = trace.steps[keep_rows]
        if len(steps) > 1:
            page.figure(plots.gradient_heatmap(steps, layers, values, title="Gradient flow: layer x step",
                                               quantity=quantity), "gradient heatmap")
        if not lines or len(layers) <= _MAX_BARS:
            picked = _bars_drawn(values[-1])
            title = "Gradient per layer, last recorded step"
            if len(picked) < len(layers):
                title += (f" ({len(picked)} of {len(layers)} layers: evenly spaced, with the smallest and largest; "
                          f"{len(layers) - len(picked)} left out)")
            last = {f"step {int(steps[-1])}": list(values[-1][picked])}
            page.figure(plots.layer_bars([layers[i] for i in picked], last, title=title, quantity=quantity),
                        "per-layer gradient bars")
    if "time_grad_rms" in trace.series_names:
        curves = {}
        series = trace.series("time_grad_rms")
        for layer, (steps, values) in series.items():
            curves[f"{layer}, step {int(steps[0])}"] = list(values[0])
            if len(steps) > 1:
                curves[f"{layer}, step {int(steps[-1])}"] = list(values[-1])
        title = "Gradient through time"
        if len(curves) > DRAWN_LINES:
            title += f" ({DRAWN_LINES} of {len(curves)} curves; {len(curves) - DRAWN_LINES} left out)"
            curves = dict(list(curves.items())[:DRAWN_LINES])
        page.figure(plots.time_curves(curves, title=title), "per-time-step gradient")
    if "loss" in trace.scalar_names:
        steps, loss = trace.scalar("loss")
        if len(steps) > 1:
            lr = trace.scalar("lr") if "lr" in trace.scalar_names else None
            lr = (list(lr[0]), list(lr[1])) if lr is not None and len(lr[0]) > 1 else None
            page.figure(plots.loss_curves({"loss": (list(steps), list(loss))}, title="Training loss"
                                          + (" and learning rate" if lr else ""), lr=lr), "loss curve")
