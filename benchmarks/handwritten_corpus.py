"""gm.check on the hand-written corpus (tests/handwritten.py, issue 28): every entry checked at init and after
``STEPS`` Adam steps (``steps=5``), on one thread, against its expected verdict; the check times beside them.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/handwritten_corpus.py [--out PATH] [name-substring ...]

Prints one row per entry and writes the table to ``benchmarks/handwritten_corpus.md`` (or ``--out``);
``--benchmarks-md`` also rewrites its section of BENCHMARKS.md (the run over every entry only).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmedic as gm  # noqa: E402
from benchmarks._markdown import replace_section  # noqa: E402
from tests.handwritten import ENTRIES, STEPS, describe, judge  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- handwritten:begin -->", "<!-- handwritten:end -->"
DEFAULT_OUT = ROOT / "benchmarks" / "handwritten_corpus.md"


def _timed_check(build, steps: int):
    model, inputs, kwargs = build()
    start = time.perf_counter()
    report = gm.check(model, inputs, steps=steps, **kwargs)
    return report, time.perf_counter() - start


def _warm_up() -> None:
    """One check with steps before timing: the process's first optimizer step pays one-time costs (5 s on the
    U-Net, the first entry, against 0.7 s after) that belong to no entry."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    gm.check(model, torch.randn(8, 4), torch.randint(0, 2, (8,)), steps=STEPS)


def run(names: list[str]) -> list[dict]:
    _warm_up()
    rows = []
    for entry in ENTRIES:
        if names and not any(n.lower() in entry.name.lower() for n in names):
            continue
        start = time.perf_counter()
        entry.build()  # the build alone (a trained entry trains here): timed apart from the checks
        build_s = time.perf_counter() - start
        r0, t0 = _timed_check(entry.build, 0)
        r5, t5 = _timed_check(entry.build, STEPS)
        ok0, why0 = judge(r0, entry.at_init)
        ok5, why5 = judge(r5, entry.after_steps)
        row = {"name": entry.name, "class": entry.issue_class, "trained": entry.trained,
               "expect0": str(entry.at_init), "expect5": str(entry.after_steps),
               "says0": describe(r0), "says5": describe(r5), "ok0": ok0, "ok5": ok5, "why0": why0, "why5": why5,
               "t0": t0, "t5": t5, "build": build_s,
               "sick": entry.at_init.kind is not None or entry.at_init.undetermined
               or entry.after_steps.kind is not None or entry.after_steps.undetermined}
        rows.append(row)
        print(f"{'ok ' if ok0 else 'BAD'} {'ok ' if ok5 else 'BAD'} {entry.name} | expect {row['expect0']} / "
              f"{row['expect5']} | init: {row['says0']} ({t0:.2f}s) | steps={STEPS}: {row['says5']} ({t5:.2f}s)",
              flush=True)
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(rows: list[dict]) -> str:
    healthy = [r for r in rows if not r["sick"]]
    sick = [r for r in rows if r["sick"]]
    counts = (f"Healthy silent at init: {sum(r['ok0'] for r in healthy)}/{len(healthy)}; after {STEPS} steps: "
              f"{sum(r['ok5'] for r in healthy)}/{len(healthy)}. Sick (or cannot-tell) entries found right at init: "
              f"{sum(r['ok0'] for r in sick)}/{len(sick)}; after {STEPS} steps: {sum(r['ok5'] for r in sick)}/"
              f"{len(sick)}. All verdicts right: {sum(r['ok0'] + r['ok5'] for r in rows)}/{2 * len(rows)}.")
    lines = [MARK_BEGIN, "## gm.check on hand-written torch.nn models (issue 28)", "",
             "`python benchmarks/handwritten_corpus.py`: each entry of `tests/handwritten.py` (hand-written models at "
             "their usual init, some trained to a good result, and sick twins of issue 28's classes with ground truth "
             "measured without gradmedic) checked at init and after "
             f"{STEPS} Adam steps (`steps={STEPS}`), one thread. Class: the issue-28 class an entry exercises.", "",
             counts, "",
             "| entry | class | expected at init | gradmedic at init | right | expected after 5 steps | "
             "gradmedic after 5 steps | right | check init (s) | check steps=5 (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']}{' (trained)' if r['trained'] else ''} | {r['class'] or ''} | {r['expect0']} | "
                     f"{r['says0']} | {_yes(r['ok0'])} | {r['expect5']} | {r['says5']} | {_yes(r['ok5'])} | "
                     f"{r['t0']:.2f} | {r['t5']:.2f} |")
    lines.append(MARK_END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only entries whose name contains one of these")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--benchmarks-md", action="store_true", help="also rewrite its section of BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = run(args.names)
    text = table(rows)
    args.out.write_text(text + "\n")
    if args.benchmarks_md and not args.names:
        replace_section(ROOT / "BENCHMARKS.md", MARK_BEGIN, MARK_END, text)
    print(text)


if __name__ == "__main__":
    main()
