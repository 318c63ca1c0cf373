"""How long ``gm.check`` takes on a 100-layer MLP (width 256, batch 64), against a plain forward+backward.

    python benchmarks/check_speed.py      # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmedic as gm  # noqa: E402
from benchmarks._markdown import replace_section  # noqa: E402

console = Console()
MARK_BEGIN, MARK_END = "<!-- check:begin -->", "<!-- check:end -->"


def build(depth: int = 100, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(width, width)]
    for _ in range(depth - 1):
        layers += [nn.Tanh(), nn.Linear(width, width)]
    return nn.Sequential(*layers)


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(repeats: int = 7) -> None:
    model, x = build(), torch.randn(64, 256)

    def plain():
        model.zero_grad()
        model(x).square().mean().backward()

    base = timed(plain, repeats)
    check = timed(lambda: gm.check(model, x), repeats)
    med_base, med_check = statistics.median(base), statistics.median(check)
    console.print(f"plain forward+backward {1000 * med_base:.1f} ms; gm.check {1000 * med_check:.0f} ms "
                  f"(ratio {med_check / med_base:.1f}); target <= 2000 ms")
    block = "\n".join([
        MARK_BEGIN, "## `gm.check` speed (`benchmarks/check_speed.py`)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU; median of {repeats} after a warm-up.", "",
        "| model | plain forward+backward | `gm.check` | ratio | target |", "|---|---:|---:|---:|---:|",
        f"| MLP 100 x Linear(256, 256) + tanh, batch 64 | {1000 * med_base:.1f} ms | {1000 * med_check:.0f} ms | "
        f"{med_check / med_base:.1f} | <= 2000 ms |",
        "", "`check` (steps=0) runs one forward and backward on the model itself, with no copy, with every probe "
        "(and the signal-propagation view), flushes once and runs the rules.", MARK_END, ""])
    path = ROOT / "BENCHMARKS.md"
    replace_section(path, MARK_BEGIN, MARK_END, block)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
