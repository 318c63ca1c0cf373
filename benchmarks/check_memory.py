"""Peak memory of ``gm.check`` against one plain forward+backward, each in a fresh process.

    python benchmarks/check_memory.py [--width 1024] [--depth 12]

Each variant runs in its own subprocess (so one's freed memory cannot hide the next one's): the model
and the input are built, the peak resident set size is reset (``/proc/self/clear_refs``), the variant runs
once, and the extra memory is the peak minus the resident size just before it. The default model, a
1024-wide 12-layer tanh MLP, holds 12.6M float32 parameters (50 MB). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain", "check", "check_steps1")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(variant: str, width: int, depth: int) -> dict[str, float]:
    """Run one variant in this process; the extra peak resident memory it needed, in MB."""
    import torch
    from torch import nn

    import gradmedic as gm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers)
    x = torch.randn(64, width)
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _rss_mb()
    if variant == "plain":
        model(x).mean().backward()
    elif variant == "check":
        gm.check(model, x)
    elif variant == "check_steps1":  # steps > 0 trains a deep copy
        gm.check(model, x, steps=1)
    else:
        raise ValueError(variant)
    return {"params_mb": params_mb, "extra_mb": _peak_mb() - before}


def run_all(width: int = 1024, depth: int = 12, variants: tuple[str, ...] = VARIANTS) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = {}
    for variant in variants:
        done = subprocess.run([sys.executable, __file__, "--one", variant, "--width", str(width), "--depth",
                               str(depth)], capture_output=True, text=True, env=env, check=True, timeout=300)
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.width, args.depth)))
        return
    results = run_all(args.width, args.depth)
    plain = results["plain"]["extra_mb"]
    print(f"MLP {args.depth}x{args.width} tanh, batch 64, parameters {results['plain']['params_mb']:.1f} MB")
    print("| variant | extra peak RSS MB | vs plain forward+backward |")
    print("|---|---:|---:|")
    for variant, r in results.items():
        print(f"| {variant} | {r['extra_mb']:.1f} | {r['extra_mb'] / plain:.2f}x |")


if __name__ == "__main__":
    main()
