"""The command line's commands other than ``check``: the demo, the lab (list, run, publish) and reports. Each takes
the parsed arguments and returns the exit status; a failure is one line (``_cli_common.fail``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gradmedic._cli_common import cannot_write, fail, make_console

__all__ = ["demo", "in_suite_order", "lab_list", "lab_publish", "lab_run", "report", "save_treated"]

def demo(args: argparse.Namespace) -> int:

    from gradmedic._errors import GradmedicError
    from gradmedic.demo import run_demo

    try:
        run_demo(steps=args.steps, depth=args.depth, seed=args.seed, html=args.report, console=make_console())
    except GradmedicError as error:
        return fail(str(error))
    except OSError as error:
        return fail(cannot_write(args.report, error))
    return 0

def lab_list(args: argparse.Namespace) -> int:
    from gradmedic._rich import Table
    from gradmedic.lab.suites import SUITES

    if args.json:
        print(json.dumps({name: {"description": s.description, "runs": len(s.configs), "seeds": list(s.seeds),
                                 "experiments": [e.name for e in s.experiments]} for name, s in SUITES.items()},
                         indent=2))
        return 0
    table = Table(title="gradmedic lab suites", title_justify="left")
    for header in ("suite", "runs", "experiments", "description"):
        table.add_column(header)
    for name, suite in SUITES.items():
        table.add_row(name, str(len(suite.configs)), ", ".join(e.name for e in suite.experiments), suite.description)
    make_console().print(table)
    return 0

def lab_run(args: argparse.Namespace) -> int:
    import time

    from gradmedic._errors import GradmedicError
    from gradmedic.lab.claims import group_results, judge
    from gradmedic.lab.runner import Terminated, run_suite
    from gradmedic.lab.store import Store
    from gradmedic.lab.suites import get_suite

    console = make_console(stderr=args.json)
    try:
        suite = get_suite(args.suite)
        store = Store(args.db)
        start = time.perf_counter()
        summary = run_suite(suite, store, workers=args.workers, progress=not args.no_progress,
                            backend=args.backend, address=args.address, only=tuple(args.only))
        elapsed = time.perf_counter() - start
        rows = in_suite_order(suite.configs, store.results(suite.name))
        verdicts = judge(group_results(rows), suite.tests_claims)  # a row from elsewhere is one line too
    except GradmedicError as error:
        return fail(str(error))
    except KeyboardInterrupt as stop:
        try:
            saved = len(Store(args.db, readonly=True).finished(args.suite))
            done = f"{saved} finished runs of {args.suite!r} are saved in {args.db}"
        except (GradmedicError, KeyboardInterrupt):
            done = "nothing was lost that had finished"
        how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"gradmedic: {how}; {done}. Run the same command again to resume.", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130  # 143 = 128 + SIGTERM, as a shell reports it
    if args.json:
        print(json.dumps({"suite": suite.name, "runs": summary.total, "skipped": summary.skipped,
                          "finished": summary.finished, "failed": [list(f) for f in summary.failed],
                          "seconds": round(elapsed, 1),
                          "claims": [{**vars(v), "summary": v.summary} for v in verdicts]}, indent=2))
    else:
        from gradmedic._rich import Table, Text

        table = Table(title=f"Claims ({suite.name}, {len(rows)} runs)", title_justify="left", show_lines=True)
        for header in ("claim", "verdict", "measured"):
            table.add_column(header, overflow="fold")
        style = {"supported": "green", "not supported": "red", "inconclusive": "yellow", "not run": "dim",
                 "not tested at this budget": "dim"}
        for v in verdicts:
            table.add_row(Text(v.claim), Text(v.summary, style=style.get(v.verdict, "")), Text(v.evidence))
        console.print(table)
        console.print(Text(f"{summary.finished} runs finished, {summary.skipped} already in {args.db}, "
                           f"{len(summary.failed)} failed; {elapsed:.0f} s. HTML: gradmedic report {args.db} -o "
                           "report.html"))
    for name, error in summary.failed:
        print(f"gradmedic: run failed: {name}: {error}", file=sys.stderr)
    return 1 if summary.failed else 0

def in_suite_order(configs: list[dict[str, Any]], results) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(config, result) rows in the suite's own order (stored order, by key, for runs the suite no longer
    has), so that the claims' evidence reads the same however the runs were scheduled or finished."""
    from gradmedic.lab.store import run_key

    position = {run_key(c): i for i, c in enumerate(configs)}
    rows = [(c, r) for _, c, r, _ in results]
    return sorted(rows, key=lambda row: position.get(run_key(row[0]), len(position)))

def lab_publish(args: argparse.Namespace) -> int:
    from gradmedic._errors import GradmedicError
    from gradmedic.lab.publish import publish

    try:
        publish(args.db, args.suite, args.files)
    except GradmedicError as error:
        return fail(str(error))
    except OSError as error:
        return fail(cannot_write(error.filename, error))
    print(f"Claims of suite {args.suite!r} from {args.db} written to {', '.join(args.files)}")
    return 0

def report(args: argparse.Namespace) -> int:
    from gradmedic._errors import GradmedicError
    from gradmedic.report import report_page, suite_page, write_page

    source = Path(args.source[0])
    try:
        if len(args.source) > 1:  # runs side by side
            from gradmedic.report.compare import compare_files

            out = compare_files(args.source, args.output)
            print(f"Comparison of {len(args.source)} runs written to {out}")
            return 0
        if not source.is_file():
            raise GradmedicError(f"no such file: {source} (give a lab database or a .gmtrace file)")
        with source.open("rb") as handle:
            magic = handle.read(16)
        if magic.startswith(b"SQLite format 3"):
            from gradmedic.lab.store import Store
            from gradmedic.lab.suites import SUITES

            store = Store(source, readonly=True)  # a report changes nothing in what it reads
            suites = store.suites()
            if not suites:
                raise GradmedicError(f"{source} has no lab results yet; run gradmedic lab run SUITE --db "
                                     f"{source}")
            name = args.suite or (suites[0] if len(suites) == 1 else None)
            if name is None or name not in suites:
                raise GradmedicError(f"{source} holds suites {', '.join(suites)}; choose one with --suite")
            rows = in_suite_order(SUITES[name].configs if name in SUITES else [], store.results(name))
            wall = sum(w for _, _, _, w in store.results(name))
            page = suite_page(name, rows, SUITES[name].description if name in SUITES else "", wall)
        elif magic.startswith(b"PK"):
            import gradmedic as gm

            trace = gm.Trace.load(source)
            # the model and the file's folder too: every integration names its trace gradmedic.gmtrace, in the run's
            # output directory, so the file name alone tells no two runs apart
            where = f"{source.parent.name}/{source.name}" if source.parent.name else source.name
            page = report_page(gm.diagnose(trace),
                               title=f"gradmedic report: {trace.meta.get('model') or 'a model'} ({where})")
        else:
            raise GradmedicError(f"{source} is neither a lab database (SQLite) nor a trace (.gmtrace)")
        out = write_page(page, args.output)
    except GradmedicError as error:
        return fail(str(error))
    except OSError as error:
        return fail(cannot_write(args.output, error))
    print(f"Report written to {out}")
    return 0


def save_treated(treatment: Any, original: Any, path: str, force: bool, target: str,
                 calls: bool = True) -> tuple[str | None, str]:
    """``check --treat N --save PATH``: the treated model's ``state_dict`` written atomically (``_files``), never over
    an existing file without ``--force``; (an error line or None, the text that says how to use it: how to load it
    into the user's model, what changed its structure, and the recipe to put in the training loop). ``calls=False``:
    the treatment's ``howto()`` lines were printed just before (``check`` prints the Treatment), so they are referred
    to, not repeated."""
    import io

    import torch

    from gradmedic._files import write_atomic
    out = Path(path)
    if out.is_dir():
        return f"cannot write {path}: it is a folder; give a file name (e.g. treated.pt)", ""
    if (out.exists() or out.is_symlink()) and not force:
        return f"{path} exists; pass --force to replace it, or give another path", ""
    state = treatment.model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_atomic(out, buffer.getvalue())
    except OSError as error:
        return cannot_write(path, error), ""
    before = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in state.items()}
    lines = [f"Saved the treated model's state_dict to {path}."]
    structural = before != after
    model_changes = [(rid, what) for rid, what, _ in treatment.applied]
    for rid, what in model_changes:
        lines.append(f"  applied {rid}: {what}")
    how = treatment.howto()  # the calls on the model and the recipe, in plain PyTorch, Trainer and Lightning terms
    if structural:
        added = sorted(set(after) - set(before))
        lines.append(f"The treatment changed the model's structure ({len(added)} new tensor(s), e.g. "
                     f"{', '.join(added[:3]) or 'reshaped ones'}): build your model as {target} does, apply the same "
                     f"change in code first (the calls {'below' if calls else 'above'}), then: "
                     f"model.load_state_dict(torch.load({str(path)!r}))")
    elif model_changes:
        lines.append(f"Reproduce it: build your model as {target} does, then "
                     f"model.load_state_dict(torch.load({str(path)!r})) (every re-drawn or rescaled weight is in it)")
    else:
        lines.append("No change to the model: the state_dict is the model's own.")
    if how.remedies and calls:
        lines.append("To do the same in your code:")
        lines += ["  " + line for line in how.lines()]
    return None, "\n".join(lines)
