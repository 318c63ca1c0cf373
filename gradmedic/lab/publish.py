"""Write the lab's claims table into Markdown files, from a lab database, so no published number is typed.

``publish(db, suite, paths)`` rewrites, in each file, the text between the markers

    <!-- gradmedic-lab:claims:begin -->
    <!-- gradmedic-lab:claims:end -->

with the claims table of ``suite`` (verdict with its seed agreement, each number as median [min, max] over
seeds, the literature's figure), headed by where the numbers came from: the suite, its seeds and runs, and
the machines (platform, PyTorch's CPU kernel capability, torch version) recorded by the runs themselves.
Everything outside the markers is left as it was.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError
from gradmedic.lab.claims import group_results, judge
from gradmedic.lab.store import Store
from gradmedic.lab.suites import SUITES

__all__ = ["BEGIN", "END", "claims_markdown", "publish"]

BEGIN = "<!-- gradmedic-lab:claims:begin -->"
END = "<!-- gradmedic-lab:claims:end -->"


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


def _rewrite(path: Path, table: str) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise GradmedicError(f"cannot read {path}: {error.strerror or error}") from None
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise GradmedicError(f"{path} has no claims section; add the two lines {BEGIN} and {END} where the "
                             "table should go.")
    new = text[:start + len(BEGIN)] + "\n" + table + "\n" + text[stop:]
    path.write_text(new, encoding="utf-8")


def publish(db: str | Path, suite: str, paths: list[str | Path]) -> str:
    """Rewrite the claims section of every file in ``paths`` from ``suite``'s results in ``db``."""
    if not Path(db).is_file():
        raise GradmedicError(f"no such lab database: {db} (run gradmedic lab run SUITE --db {db} first)")
    store = Store(db, readonly=True)  # publishing reads the database, never changes it
    results = list(store.results(suite))
    if not results:
        raise GradmedicError(f"{db} has no results of suite {suite!r}; it holds: "
                             f"{', '.join(store.suites()) or 'nothing'}")
    table = claims_markdown(suite, [(c, r) for _, c, r, _ in results], sum(w for *_, w in results))
    for path in paths:
        _rewrite(Path(path), table)
    return table
