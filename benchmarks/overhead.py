"""What watching gradients costs: a training step with and without gradmedic's Monitor.

Three workloads (an 8x512 tanh MLP, a 6-conv BN/ReLU CNN, a 2-layer LSTM) are timed plain, under each
Monitor preset, and under two reference styles of per-step gradient logging written here:
Lightning's ``grad_norm`` (a ``.norm()`` per parameter, read with ``.item()``) and ``wandb.watch``'s
gradient histograms (a 64-bin ``histc`` per parameter, moved with ``.cpu()``). Every variant runs its
own copy of the same model; the variants are interleaved step by step, in a shuffled order at each
step, and the figure reported is the median over repeats of (variant time / plain time in the same
repeat), so drift of the machine, even within a second, hits every variant alike. Then host syncs
between flushes are counted and memory is followed over 2,000 monitored steps. Results go to
BENCHMARKS.md (between the markers) and to stdout.

    python benchmarks/overhead.py            # full run (~10 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # a smoke run with few steps
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmedic as gm  # noqa: E402
from benchmarks._markdown import replace_section  # noqa: E402
from tests.helpers import count_host_syncs  # noqa: E402

console = Console()


# --- workloads ------------------------------------------------------------------------------------
def mlp() -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]], Callable]:
    widths = [784] + [512] * 8 + [10]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return nn.Sequential(*layers[:-1]), lambda: (x, y), nn.functional.cross_entropy


def cnn() -> tuple[nn.Module, Callable, Callable]:
    layers: list[nn.Module] = []
    channels = [1, 16, 16, 32, 32, 32, 32]
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=False)):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    return nn.Sequential(*layers), lambda: (x, y), nn.functional.cross_entropy


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(32, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x):  # x: (B, T, C)
        return self.head(self.lstm(x)[0][:, -1])


def lstm() -> tuple[nn.Module, Callable, Callable]:
    x, y = torch.randn(64, 50, 32), torch.randint(0, 10, (64,))
    return LSTMNet(), lambda: (x, y), nn.functional.cross_entropy


WORKLOADS = {"MLP 784-512x8-10 tanh, batch 128": mlp, "CNN 6 conv BN/ReLU 28x28, batch 64": cnn,
             "LSTM 2x256, T=50, batch 64": lstm}


# --- reference styles -----------------------------------------------------------------------------
class LightningGradNorm:
    """Per-parameter 2-norm read to the host with .item(), as Lightning's grad_norm logging does."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.log: list[dict[str, float]] = []

    def step(self, loss=None) -> None:
        self.log.append({n: p.grad.norm(2).item() for n, p in self.model.named_parameters() if p.grad is not None})


class WandbHistograms:
    """Per-parameter 64-bin gradient histogram moved to the host, as wandb.watch(log="gradients") does."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.log: list[dict] = []

    def step(self, loss=None) -> None:
        entry = {}
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            lo, hi = g.min().item(), g.max().item()
            entry[name] = (torch.histc(g, bins=64, min=lo, max=hi).cpu(), lo, hi)
        self.log.append(entry)


VARIANTS = ("plain", "cheap", "standard", "full", "lightning", "wandb")


def make_watcher(variant: str, model: nn.Module, opt: torch.optim.Optimizer):
    if variant == "plain":
        return None
    if variant == "lightning":
        return LightningGradNorm(model)
    if variant == "wandb":
        return WandbHistograms(model)
    return gm.Monitor(model, opt, preset=variant)


def run_steps(model, opt, batch, loss_fn, watcher, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        x, y = batch()
        loss = loss_fn(model(x), y)
        loss.backward()
        if watcher is not None:
            watcher.step(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_workload(build, repeats: int, steps: int, progress, task) -> dict[str, float]:
    torch.manual_seed(0)
    base, batch, loss_fn = build()
    runs = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        runs[variant] = (model, opt, make_watcher(variant, model, opt))
    for model, opt, watcher in runs.values():  # warm-up, not timed
        run_steps(model, opt, batch, loss_fn, watcher, 3)
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rng = random.Random(0)
    for _ in range(repeats):
        times = dict.fromkeys(VARIANTS, 0.0)
        for _ in range(steps):  # interleaved step by step, in a shuffled order: drift hits every variant alike
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                model, opt, watcher = runs[variant]
                times[variant] += run_steps(model, opt, batch, loss_fn, watcher, 1)
        progress.advance(task, len(VARIANTS))
        for variant in VARIANTS:
            ratios[variant].append(times[variant] / times["plain"])
        ratios.setdefault("_plain_ms", []).append(1000 * times["plain"] / steps)
    for _, _, watcher in runs.values():
        if isinstance(watcher, gm.Monitor):
            watcher.close()
    return {v: statistics.median(r) for v, r in ratios.items()}


# --- host syncs and memory ------------------------------------------------------------------------
def count_syncs(build, steps: int) -> dict[str, int]:
    torch.manual_seed(0)
    model, batch, loss_fn = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = gm.Monitor(model, opt, preset="full", flush_every=10_000)
    # the first measured step builds each probe's index and count tensors once (Probe.host_tensor)
    with count_host_syncs() as first:
        run_steps(model, opt, batch, loss_fn, monitor, 1)
    with count_host_syncs() as between:
        run_steps(model, opt, batch, loss_fn, monitor, steps)
    with count_host_syncs() as at_flush:
        monitor.flush()
    monitor.close()
    return {"first": sum(first.values()), "between": sum(between.values()), "at_flush": sum(at_flush.values())}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_over_steps(preset: str, steps: int) -> list[tuple[int, float, float, float]]:
    """(step, current RSS MB, peak RSS MB, trace size MB) every steps/10 steps of the MLP."""
    torch.manual_seed(0)
    model, batch, loss_fn = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = gm.Monitor(model, opt, preset=preset)
    samples = []
    every = max(steps // 10, 1)
    for done in range(0, steps, every):
        run_steps(model, opt, batch, loss_fn, monitor, every)
        gc.collect()
        trace_mb = monitor.trace.values.nbytes / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        samples.append((done + every, rss_mb(), peak, trace_mb))
    monitor.close()
    return samples


# --- report -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps: check the script, not the numbers")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="steps per variant per repeat")
    parser.add_argument("--memory-steps", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.memory_steps = 2, 4, 40

    results = {}
    with Progress(console=console) as progress:
        for name, build in WORKLOADS.items():
            task = progress.add_task(name, total=args.repeats * len(VARIANTS))
            results[name] = time_workload(build, args.repeats, args.steps, progress, task)
    syncs = {name: count_syncs(build, 10 if not args.quick else 2) for name, build in WORKLOADS.items()}
    memory = {p: memory_over_steps(p, args.memory_steps) for p in ("standard", "full")}

    table = Table(title="Training step time, median ratio to plain")
    table.add_column("workload")
    table.add_column("plain ms/step", justify="right")
    for v in VARIANTS[1:]:
        table.add_column(v, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['_plain_ms']:.1f}", *(f"{r[v]:.3f}" for v in VARIANTS[1:]))
    console.print(table)
    console.print(f"host syncs: {syncs}")
    console.print(f"memory: {memory}")
    write_markdown(Path(args.out), args, results, syncs, memory)


MARK_BEGIN = "<!-- overhead:begin -->"
MARK_END = "<!-- overhead:end -->"


def write_markdown(path: Path, args, results, syncs, memory) -> None:
    lines = [MARK_BEGIN, "## Monitor overhead (`benchmarks/overhead.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU. "
             f"{args.repeats} repeats of {args.steps} Adam steps per variant, interleaved step by step in a "
             "shuffled order; each cell is the median over repeats of (variant time / plain time in the same "
             "repeat).", "",
             "| workload | plain ms/step | cheap | standard (default) | full | Lightning-style `.item()` "
             "| wandb-style `histc` |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['_plain_ms']:.1f} | " + " | ".join(f"{r[v]:.3f}" for v in VARIANTS[1:]) + " |")
    lines += ["", "Targets: standard <= 1.03, full <= 1.25. The reference styles run at every step, as the "
              "full preset does.", "",
              "**Host syncs and host-to-device copies between flushes** (preset full, calls of "
              "`.item()`, `.cpu()`, `.tolist()`, `.numpy()`, `bool/float/int(tensor)`, `.nonzero()`, and tensors "
              "made from host data: `torch.tensor`, `torch.as_tensor`, `torch.from_numpy`, `new_tensor`, a Python "
              "number written with `t[i] = x` or `fill_(x)`, made from gradmedic's code, counted by "
              "`tests/helpers.py:count_host_syncs`; the first measured step builds the probes' index tensors "
              "once):", "",
              "| workload | first step | later steps, between flushes | at the flush |", "|---|---:|---:|---:|"]
    for name, s in syncs.items():
        lines.append(f"| {name} | {s['first']} | {s['between']} | {s['at_flush']} |")
    lines += ["", f"**Memory over {args.memory_steps} monitored steps** (the MLP; resident set size in MB, "
              "and the size of the trace's host array, which is the data the user asked for):", "",
              "| preset | step | RSS MB | peak RSS MB | trace MB |", "|---|---:|---:|---:|---:|"]
    for preset, samples in memory.items():
        for step, rss, peak, trace_mb in samples[:: max(len(samples) // 4, 1)] + samples[-1:]:
            lines.append(f"| {preset} | {step} | {rss:.0f} | {peak:.0f} | {trace_mb:.2f} |")
    lines.append(MARK_END)
    replace_section(path, MARK_BEGIN, MARK_END, "\n".join(lines) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
