"""The ``gradmedic`` command line."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    from gradmedic import __version__

    parser = argparse.ArgumentParser(prog="gradmedic", description="Find, explain and fix vanishing and "
                                     "exploding gradients in PyTorch models.")
    parser.add_argument("--version", action="version", version=f"gradmedic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="watch a deep sigmoid MLP train and print the per-layer table")
    demo.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    demo.add_argument("--depth", type=int, default=10, help="hidden layers (default 10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save", metavar="PATH", help="also save the trace (.gmtrace)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1 or getattr(args, "depth", 1) < 1:
        parser.error("--steps and --depth should be positive integers")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
