"""The ``gradmedic`` command line.

Its contract: bad input exits 2 with one line on stderr, never a traceback; ``--json`` puts exactly the
JSON on stdout. The user's factory and model run with stdout sent to stderr (so their prints cannot
corrupt the JSON), and a factory that calls ``sys.exit`` or is interrupted cannot make a check pass.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradmedic import _cli_commands as commands
from gradmedic._cli_common import cannot_write, fail, make_console
from gradmedic._verdict import reader_gone, run_command, with_verdict

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gradmedic: error: {message} (see {self.prog} --help)\n")


def _load_factory(spec: str) -> Callable[[], Any]:
    """``path/to/file.py:function`` -> the function. Raises GradmedicError with one line."""
    from gradmedic._errors import GradmedicError, first_line

    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise GradmedicError(f"{spec!r} should be FILE.py:FUNCTION, e.g. examples/sigmoid_mlp.py:build")
    path = Path(path_text)
    if path.is_dir():
        raise GradmedicError(f"{path_text} is a folder: give a Python file and a function, FILE.py:FUNCTION")
    if not path.is_file():
        from gradmedic._paths import not_a_file

        raise GradmedicError(not_a_file(path_text, "give a Python file and a function, FILE.py:FUNCTION"))
    module_name = f"gradmedic_user_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise GradmedicError(f"cannot import {path_text}: is it a Python file?")
    module = importlib.util.module_from_spec(loader_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        loader_spec.loader.exec_module(module)
    except SystemExit as error:
        raise GradmedicError(f"importing {path_text} called sys.exit({error.code!r}); a factory file must not exit "
                             "(guard its script part with if __name__ == '__main__')") from None
    except Exception as error:
        raise GradmedicError(f"importing {path_text} failed: {type(error).__name__}: {first_line(error)}") from None
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name)
        raise GradmedicError(f"{path_text} has no function {name!r} (functions there: {', '.join(found) or 'none'})")
    return factory


def _check(args: argparse.Namespace) -> int:
    import gradmedic as gm
    from gradmedic._errors import GradmedicError

    if args.save and args.treat is None:
        return fail("--save writes the treated model: add --treat (e.g. --treat 50 --save treated.pt)")
    if args.save and not args.force and (Path(args.save).exists() or Path(args.save).is_symlink()):
        return fail(f"{args.save} exists; pass --force to replace it, or give another path")  # before any work
    try:
        with _stdout_to_stderr():  # the user's code may print; with --json stdout holds only the JSON
            case, report = _check_target(args)
            treatment = None if args.treat is None else gm.treat(
                case["model"], report, inputs=case["inputs"], targets=case.get("targets"),
                loss_fn=case.get("loss_fn"), optimizer=case.get("optimizer"), verify_steps=args.treat)
    except GradmedicError as error:
        return fail(str(error))
    except SystemExit as error:  # from the user's model: a check that did not run must not pass
        return fail(f"the model of {args.target} called sys.exit({error.code!r}) during the check")
    if args.report:
        from gradmedic.report import report_page, write_page

        try:
            write_page(report_page(report, title=f"gradmedic check: {args.target}"), args.report)
        except GradmedicError as error:  # no matplotlib: one line saying pip install 'gradmedic[report]'
            return fail(str(error))
        except OSError as error:
            return fail(cannot_write(args.report, error))
    code = 0
    if args.fail_on is not None:
        from gradmedic.diagnosis import SEVERITIES

        threshold = SEVERITIES.index(args.fail_on)
        code = 1 if any(f.rank >= threshold for f in report.findings) else 0
    try:
        if args.json:
            print(report.to_json())
        else:
            report.render(make_console())
            if args.report:
                print(f"Report written to {args.report}")
        if treatment is not None:  # with --json, stdout stays exactly Report.to_json()
            print(f"\nTreatment (gm.treat on a copy):\n{treatment}", file=sys.stderr if args.json else sys.stdout)
        if treatment is not None and args.save:
            error, text = commands.save_treated(treatment, case["model"], args.save, args.force, args.target,
                                                 calls=False)
            if error is not None:
                return fail(error)
            print(text, file=sys.stderr if args.json else sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (| head): the verdict is still the exit status
        return reader_gone(code)
    return code


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send stdout to stderr, Python's and the process's file descriptor 1 alike (C code, subprocesses)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (embedded, closed): Python's stdout only
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _check_target(args: argparse.Namespace):
    """Import the factory, build the case and check it: (case, report); every failure of the user's code is
    one line."""
    import gradmedic as gm
    from gradmedic._errors import GradmedicError, first_line

    factory = _load_factory(args.target)
    try:
        case = factory()
    except SystemExit as error:
        raise GradmedicError(f"{args.target}() called sys.exit({error.code!r}) instead of returning a dict with "
                             "'model' and 'inputs'") from None
    except Exception as error:
        raise GradmedicError(f"{args.target}() raised {type(error).__name__}: {first_line(error)}") from None
    if not isinstance(case, dict) or "model" not in case or "inputs" not in case:
        raise GradmedicError(f"{args.target}() should return a dict with 'model' and 'inputs' (and optionally "
                             f"'targets', 'loss_fn'), but returned {type(case).__name__}"
                             + (f" with keys {sorted(case)}" if isinstance(case, dict) else ""))
    unknown = sorted(set(case) - {"model", "inputs", "targets", "loss_fn", "optimizer"})
    if unknown:
        raise GradmedicError(f"{args.target}() returned unknown keys {unknown}; use model, inputs, targets, "
                             "loss_fn")
    return case, gm.check(case["model"], case["inputs"], targets=case.get("targets"), loss_fn=case.get("loss_fn"),
                          optimizer=case.get("optimizer"), steps=args.steps)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be a non-negative integer, but given {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"should be a non-negative integer, but given {text!r}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("should be a positive integer, but given 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from gradmedic import __version__

    parser = _Parser(prog="gradmedic", description="Find, explain and fix vanishing and exploding gradients in "
                     "PyTorch models.")
    parser.add_argument("--version", action="version", version=f"gradmedic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="a sick model on digits: diagnose, treat, retrain, compare")
    demo.add_argument("--steps", type=_positive, default=300, help="training steps per run (default 300)")
    demo.add_argument("--depth", type=_positive, default=10, help="hidden layers (default 10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--report", metavar="PATH", default="gradmedic-demo.html",
                      help="HTML report path (default gradmedic-demo.html)")
    demo.set_defaults(run=commands.demo)
    check = sub.add_parser("check", help="diagnose a model built by FILE.py:FUNCTION")
    check.add_argument("target", metavar="FILE.py:FUNCTION",
                       help="FUNCTION() returns a dict with model, inputs, and optionally targets, loss_fn, "
                            "optimizer (used by --steps and --treat)")
    check.add_argument("--steps", type=_non_negative, default=0, help="optimizer steps after the first look")
    check.add_argument("--json", action="store_true", help="print the report as JSON (Report.to_json())")
    check.add_argument("--fail-on", choices=("warning", "error"), default=None,
                       help="exit 1 when a finding this severe or worse is present (for CI)")
    check.add_argument("--report", metavar="OUT.html", help="also write an HTML report with figures")
    check.add_argument("--treat", nargs="?", type=_non_negative, const=50, default=None, metavar="N",
                       help="treat a copy (gm.treat) and prove each remedy by N training steps (default 50; 0: no "
                            "training, re-checks only)")
    check.add_argument("--save", metavar="PATH", help="with --treat: write the treated model's state_dict to PATH "
                       "(atomically, never over an existing file) and print how to load it into your model")
    check.add_argument("--force", action="store_true", help="with --save: replace an existing file")
    check.set_defaults(run=_check)
    lab = sub.add_parser("lab", help="the lab: run the classic experiments and judge the claims")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    lab_list = lab_sub.add_parser("list", help="the suites and their experiments")
    lab_list.add_argument("--json", action="store_true")
    lab_list.set_defaults(run=commands.lab_list)
    lab_run = lab_sub.add_parser("run", help="run a suite (resumes: finished runs are skipped)")
    lab_run.add_argument("suite", metavar="SUITE", help="a suite name (gradmedic lab list)")
    lab_run.add_argument("--workers", type=_positive, default=None, help="worker processes (default: CPU cores)")
    lab_run.add_argument("--db", default="gradmedic-lab.db", help="results database (default gradmedic-lab.db)")
    lab_run.add_argument("--backend", choices=("process", "ray"), default="process",
                         help="process: a local process pool (default); ray: Ray tasks (pip install gradmedic[ray])")
    lab_run.add_argument("--address", default=None,
                         help="with --backend ray: an existing cluster ('auto', 'ray://HOST:10001'); "
                              "default: a local Ray instance")
    lab_run.add_argument("--json", action="store_true", help="print the claims and counts as JSON")
    lab_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    lab_run.add_argument("--only", action="append", default=[], metavar="PATTERN",
                         help="run only the runs whose name ('experiment: label (seed N)') matches this shell "
                         "pattern; repeatable (e.g. --only 'transformer_depth: * d=96 (*')")
    lab_run.set_defaults(run=commands.lab_run)
    lab_pub = lab_sub.add_parser("publish", help="write a suite's claims table into BENCHMARKS.md from a database")
    lab_pub.add_argument("db", metavar="DB", help="a lab database")
    lab_pub.add_argument("--suite", default="quick", help="which suite's results (default quick)")
    lab_pub.add_argument("files", nargs="*", metavar="FILE.md", default=["BENCHMARKS.md"],
                         help="Markdown files with a claims section (default BENCHMARKS.md)")
    lab_pub.set_defaults(run=commands.lab_publish)
    report = sub.add_parser("report", help="an HTML report of a lab database or a saved trace; two or more traces: "
                                           "side by side, the findings that differ first")
    report.add_argument("source", metavar="DB|TRACE", nargs="+", help="a lab database or .gmtrace file(s)")
    report.add_argument("-o", "--output", required=True, metavar="report.html")
    report.add_argument("--suite", help="which suite, when the database holds several")
    report.set_defaults(run=commands.report)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if argv is None and args.run is _check:  # the command itself: no verdict, no pass (gradmedic._verdict)
            return with_verdict(lambda: run_command(args.run, args), f"gradmedic check {args.target}")
        return run_command(args.run, args)
    except KeyboardInterrupt:  # Ctrl-C anywhere, start-up included: one line, the shell's 130
        print("gradmedic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
