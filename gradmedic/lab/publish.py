"""Write the lab's claims table into Markdown files, from a lab database, so no published number is typed.

``publish(db, suite, paths)`` rewrites, in each file, the text between the markers

    <!-- gradmedic-lab:claims:begin -->
    <!-- gradmedic-lab:claims:end -->

with the claims table of ``suite`` (verdict with its seed agreement, each number as median [min, max] over
seeds, the literature's figure), headed by where the numbers came from: the suite, its seeds and runs, and
the machines (platform, PyTorch's CPU kernel capability, torch version) recorded by the runs themselves.
Everything outside the markers is left as it was.

A suite with the transformer depth experiment (``depth``) also has a depth section, between

    <!-- gradmedic-lab:depth:begin -->
    <!-- gradmedic-lab:depth:end -->

its claims, the table of layouts x depths (``depth_table``) and the figure of the stream's gradient against depth,
drawn into ``docs/figures/lab-depth.png`` beside the first file that has the section. A file must hold at least
one of the two sections; each is written where its markers are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError
from gradmedic.lab.claims import group_results, judge
from gradmedic.lab.depth_table import INIT_EXPERIMENT, depth_cells, depth_markdown, save_depth_figure
from gradmedic.lab.store import Store
from gradmedic.lab.suites import SUITES

__all__ = ["BEGIN", "DEPTH_BEGIN", "DEPTH_END", "DEPTH_FIGURE", "END", "claims_markdown", "publish"]

BEGIN = "<!-- gradmedic-lab:claims:begin -->"
END = "<!-- gradmedic-lab:claims:end -->"
DEPTH_BEGIN = "<!-- gradmedic-lab:depth:begin -->"
DEPTH_END = "<!-- gradmedic-lab:depth:end -->"
DEPTH_FIGURE = Path("docs", "figures", "lab-depth.png")  # relative to the first file with a depth section


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _machines(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    seen = sorted({(m.get("platform", "?"), m.get("cpu_capability", "?"), m.get("torch", "?"))
                   for _, r in rows for m in [r.get("machine") or {}]})
    return "; ".join(f"{p}, CPU capability {c}, torch {t}" for p, c, t in seen) or "not recorded"


def claims_markdown(suite: str, rows: list[tuple[dict[str, Any], dict[str, Any]]], wall_s: float | None = None) -> str:
    """The claims table of one suite's results, with its provenance, as Markdown."""
    # checks the rows first (rows.check_rows): every one has its seed
    verdicts = judge(group_results(rows), SUITES[suite].tests_claims if suite in SUITES else True)
    seeds = sorted({c["seed"] for c, _ in rows})
    head = (f"From `gradmedic lab run {suite}`: {len(rows)} runs, seeds {seeds}"
            + (f", {wall_s:.0f} s of summed run wall time" if wall_s else "") + f". Machine: {_machines(rows)}. "
            f"Written by `gradmedic lab publish` on {time.strftime('%Y-%m-%d', time.gmtime())}. Numbers: median "
            "[min, max] over seeds, with the cut-off each is judged against.")
    lines = [head, "", "| claim | verdict | measured | literature |", "|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {_cell(v.claim)} | **{_cell(v.summary)}** | {_cell(v.evidence)} | {_cell(v.literature)} |")
    return "\n".join(lines)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise GradmedicError(f"cannot read {path}: {error.strerror or error}") from None


def _has(text: str, begin: str, end: str) -> bool:
    start = text.find(begin)
    return start >= 0 and text.find(end) > start


def _replace(text: str, begin: str, end: str, table: str) -> str:
    start, stop = text.find(begin), text.find(end)
    return text[:start + len(begin)] + "\n" + table + "\n" + text[stop:]


def publish(db: str | Path, suite: str, paths: list[str | Path]) -> str:
    """Rewrite the claims section (and, for a suite with the depth experiment, the depth section) of every file in
    ``paths`` from ``suite``'s results in ``db``; returns the claims table."""
    if not Path(db).is_file():
        raise GradmedicError(f"no such lab database: {db} (run gradmedic lab run SUITE --db {db} first)")
    store = Store(db, readonly=True)  # publishing reads the database, never changes it
    results = list(store.results(suite))
    if not results:
        raise GradmedicError(f"{db} has no results of suite {suite!r}; it holds: "
                             f"{', '.join(store.suites()) or 'nothing'}")
    rows = [(c, r) for _, c, r, _ in results]
    table = claims_markdown(suite, rows, sum(w for *_, w in results))
    cells, init = depth_cells(rows), depth_cells(rows, INIT_EXPERIMENT)
    texts = {Path(path): _read(Path(path)) for path in paths}
    figure = None
    for path, text in texts.items():
        depth = bool(cells) and _has(text, DEPTH_BEGIN, DEPTH_END)
        if not depth and not _has(text, BEGIN, END):
            raise GradmedicError(f"{path} has no claims section; add the two lines {BEGIN} and {END} where the "
                                 "table should go" + (f" (or {DEPTH_BEGIN} and {DEPTH_END})." if cells else "."))
        if _has(text, BEGIN, END):
            text = _replace(text, BEGIN, END, table)
        if depth:
            if figure is None:
                figure = path.parent / DEPTH_FIGURE
                save_depth_figure(cells, figure, init)
            link = Path(os.path.relpath(figure, path.parent)).as_posix()
            text = _replace(text, DEPTH_BEGIN, DEPTH_END, table + "\n\n" + depth_markdown(cells, link, init))
        path.write_text(text, encoding="utf-8")
    return table
