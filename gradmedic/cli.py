"""The ``gradmedic`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from torch import nn

    import gradmedic as gm

    console = Console()
    torch.manual_seed(args.seed)
    widths = [32] + [64] * args.depth + [10]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(256, 32)
    y = x[:, :10].argmax(dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    console.print(f"[bold]gradmedic demo[/]: a {args.depth}-layer sigmoid MLP, {args.steps} SGD steps, "
                  "every probe at every step")
    with gm.Monitor(model, optimizer, preset="full") as monitor:
        for _ in range(args.steps):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
    trace = monitor.trace
    console.print(trace.table(title=f"Per layer, at step {int(trace.steps[-1])}"))
    signal = trace.last("backward_rms")
    linear = [name for name in trace.layers if trace.meta["types"].get(name) == "Linear"]
    first, last = signal[linear[0]], signal[linear[-1]]
    console.print(f"Backward signal at the first layer is {first / last:.1e} of that at the last: "
                  f"the gradient vanishes through {args.depth} sigmoid layers.")
    if args.save:
        console.print(f"Trace saved to {trace.save(args.save)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gradmedic: error: {message} (see gradmedic {self.prog.split()[-1]} --help)\n")


def _fail(message: str) -> int:
    print(f"gradmedic: error: {message}", file=sys.stderr)
    return 2


def _load_factory(spec: str) -> Callable[[], Any]:
    """``path/to/file.py:function`` -> the function. Raises GradmedicError with one line."""
    from gradmedic._errors import GradmedicError, first_line

    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise GradmedicError(f"{spec!r} should be FILE.py:FUNCTION, e.g. examples/sigmoid_mlp.py:build")
    path = Path(path_text)
    if not path.is_file():
        raise GradmedicError(f"no such file: {path_text}")
    module_name = f"gradmedic_user_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise GradmedicError(f"cannot import {path_text}: is it a Python file?")
    module = importlib.util.module_from_spec(loader_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        loader_spec.loader.exec_module(module)
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
    from rich.console import Console

    import gradmedic as gm
    from gradmedic._errors import GradmedicError, first_line

    try:
        factory = _load_factory(args.target)
        try:
            case = factory()
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
        report = gm.check(case["model"], case["inputs"], targets=case.get("targets"), loss_fn=case.get("loss_fn"),
                          optimizer=case.get("optimizer"), steps=args.steps)
    except GradmedicError as error:
        return _fail(str(error))
    if args.json:
        print(report.to_json())
    else:
        report.render(Console())
    if args.fail_on is not None:
        from gradmedic.diagnosis import SEVERITIES

        threshold = SEVERITIES.index(args.fail_on)
        if any(f.rank >= threshold for f in report.findings):
            return 1
    return 0


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
    demo = sub.add_parser("demo", help="watch a deep sigmoid MLP train and print the per-layer table")
    demo.add_argument("--steps", type=_positive, default=20, help="training steps (default 20)")
    demo.add_argument("--depth", type=_positive, default=10, help="hidden layers (default 10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save", metavar="PATH", help="also save the trace (.gmtrace)")
    demo.set_defaults(run=_demo)
    check = sub.add_parser("check", help="diagnose a model built by FILE.py:FUNCTION")
    check.add_argument("target", metavar="FILE.py:FUNCTION",
                       help="FUNCTION() returns a dict with model, inputs, and optionally targets, loss_fn")
    check.add_argument("--steps", type=_non_negative, default=0, help="optimizer steps after the first look")
    check.add_argument("--json", action="store_true", help="print the report as JSON (Report.to_json())")
    check.add_argument("--fail-on", choices=("warning", "error"), default=None,
                       help="exit 1 when a finding this severe or worse is present (for CI)")
    check.set_defaults(run=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
