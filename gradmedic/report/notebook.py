"""What Jupyter shows for the objects a user holds: ``_repr_html_`` of ``Report``, ``Finding``, ``Trace`` and
``Treatment`` (each class's method is one line that calls here), and short plain reprs.

The HTML is a fragment, not a document: a notebook cell holds it inline. It is the report page's own content
(``report_page``), with the page's CSS scoped to a ``div.gradmedic`` so that it does not restyle the notebook.
Every text from user code is escaped (``Page`` does it). Without matplotlib the figures are left out with one
line saying how to get them, so a report still displays.
"""

from __future__ import annotations

import html
from typing import Any

from gradmedic._display import register_html
from gradmedic._errors import GradmedicError
from gradmedic.diagnosis import REMEDIES
from gradmedic.report.html import Page
from gradmedic.report.pages import report_page, trace_figures

__all__ = ["evidence_outcome", "finding_html", "report_html", "trace_html", "treatment_html"]

# the page's CSS (html._CSS), under .gradmedic: a notebook's own headings and tables keep their style
_CSS = """
.gradmedic{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;max-width:1000px}
.gradmedic h4{font-size:1.15em;margin:.4em 0}.gradmedic h2{font-size:1.1em;margin-top:1.2em;
border-bottom:1px solid #ddd}.gradmedic h3{font-size:1em}
.gradmedic table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
.gradmedic td,.gradmedic th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
.gradmedic th{background:#f4f4f4}.gradmedic td.num{text-align:right;font-variant-numeric:tabular-nums}
.gradmedic img{max-width:100%;display:block;margin:.5em 0}
.gradmedic .error{background:#fadcdc}.gradmedic .warning{background:#fff2cc}.gradmedic .info{background:#e8f0fe}
.gradmedic .healthy{background:#dcf5dc}.gradmedic .muted{color:#777;font-size:.85em}
.gradmedic summary{cursor:pointer;font-weight:600;margin:.5em 0}
"""


def fragment(page: Page) -> str:
    """The page's content as one ``<div>`` for a notebook cell: its title as a small heading, CSS scoped."""
    body = "\n".join([f"<h4>{html.escape(page.title)}</h4>", *page.body()])
    return f'<div class="gradmedic"><style>{_CSS}</style>\n{body}\n</div>'


def _figures(page: Page, draw: Any) -> None:
    """Figures when matplotlib is there; one line saying how to get them when it is not."""
    try:
        draw()
    except GradmedicError as error:  # the one-line "pip install 'gradmedic[report]'"
        page.paragraph(f"No figures: {error}", muted=True)


def _verdict(report: Any) -> tuple[str, str]:
    if report.healthy:
        return "healthy", f"Healthy: {len(report.findings)} finding(s), none a warning or an error."
    return report.worst(), f"Not healthy ({report.worst()}): {len(report.findings)} finding(s)."


def report_html(report: Any) -> str:
    """The report page inline: the verdict, the findings with what to do, the figures, the folded layer table."""
    try:
        page = report_page(report)
    except GradmedicError as error:  # no matplotlib: the same page without its figures, and how to get them
        page = report_page(report, figures=False)
        page.paragraph(f"No figures: {error}", muted=True)
    cls, text = _verdict(report)
    page.lead(text, cls or "healthy")
    return fragment(page)


def finding_html(finding: Any) -> str:
    """One finding: severity, kind, where, the message, the remedies with their descriptions, the evidence."""
    page = Page(f"{finding.severity}: {finding.kind}")
    where = ", ".join(x or "(model)" for x in finding.layers[:8])
    more = f" and {len(finding.layers) - 8} more" if len(finding.layers) > 8 else ""
    page.table(("where", "what was found"), [(where + more or "the model", finding.message)], [finding.severity])
    if finding.remedies:
        page.table(("remedy", "what it does"), [(r, REMEDIES[r].description) for r in finding.remedies])
    if finding.evidence:
        page.table(("evidence", "value"), [(k, _short_value(v)) for k, v in finding.evidence.items()],
                   folded=f"evidence: {len(finding.evidence)} number(s)")
    return fragment(page)


def trace_html(trace: Any) -> str:
    """A trace without its diagnosis (``gm.diagnose(trace)`` gives that): span, loss, figures, layer table."""
    model = trace.meta.get("model", "a model")
    steps = trace.steps
    page = Page(f"gradmedic trace of {model}")
    span = f"steps {int(steps[0])}..{int(steps[-1])}" if len(steps) else "no steps"
    page.paragraph(f"{len(trace.layers)} modules, {len(steps)} measured step(s) ({span}), metrics: "
                   f"{', '.join(trace.metrics)}.", muted=True)
    _figures(page, lambda: trace_figures(page, trace))
    columns = [m for m in ("backward_norm", "grad_norm", "grad_to_weight", "saturated_frac", "dead_frac")
               if m in trace.metrics]
    if columns:
        last = {m: trace.last(m) for m in columns}
        types = trace.meta.get("types", {})
        rows = [(layer or "(model)", types.get(layer, ""), *(_short_value(last[m].get(layer)) for m in columns))
                for layer in trace.layers if any(layer in last[m] for m in columns)]
        page.table(("layer", "type", *columns), rows, folded=f"{len(rows)} layers: show the table")
    return fragment(page)


def treatment_html(treatment: Any) -> str:
    """What treat did, what it advises for training, what it tried and did not keep, and the verification runs."""
    page = Page("gradmedic treatment")
    page.paragraph(f"Weights treated as {'trained' if treatment.trained else 'fresh'} ({treatment.trained_reason}).",
                   muted=True)
    page.heading("Applied to the model copy (treatment.model)", 3)
    if treatment.applied:
        page.table(("remedy", "what was done", "why"), treatment.applied)
    else:
        page.paragraph("Nothing applied to the model.")
    if treatment.recipe:
        page.heading("Training recipe (your loop applies it)", 3)
        page.table(("remedy", "what it does"), [(r, REMEDIES[r].description) for r in treatment.recipe])
    not_done = [(r, "advice", why) for r, why in treatment.advice] + \
               [(r, "tried, not kept", why) for r, why in treatment.skipped]
    if not_done:
        page.heading("Not done", 3)
        page.table(("remedy", "", "why"), not_done)
    if treatment.evidence:
        page.heading("Verified by training (score: mean loss over the last steps)", 3)
        page.table(("stage", "score", "outcome"), [(e.stage, _short_value(e.score), evidence_outcome(e))
                                                    for e in treatment.evidence])
    return fragment(page)


def evidence_outcome(evidence: Any) -> str:
    """The untreated run is the baseline the others are measured against: neither kept nor dropped."""
    if evidence.stage == "untreated":
        return "baseline"
    return "kept" if evidence.kept else "not kept"


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{', '.join(_short_value(v) for v in value[:6])}, ... {len(value)} values]"
    return "" if value is None else str(value)


# handed down to the objects' _repr_html_ (gradmedic._display): their classes name no stage above their own
register_html("Report", report_html)
register_html("Finding", finding_html)
register_html("Trace", trace_html)
register_html("Treatment", treatment_html)
