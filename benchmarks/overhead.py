"""What watching gradients costs: a training step with and without gradmedic's Monitor.

Workloads: an 8x512 tanh MLP, a 6-conv BN/ReLU CNN, a 2-layer LSTM, a GPT-2 (transformers' own
architecture from a config, random weights) and a depth sweep of width-256 tanh MLPs (10, 50, 200
layers). Each is timed plain, as a second plain copy (the control: the noise floor), under each Monitor
preset, and under three reference styles of per-step gradient logging written here: Lightning's
``grad_norm`` (a ``.norm()`` per parameter, read with ``.item()``), a wandb-style hook (a 64-bin ``histc``
per parameter moved with ``.cpu()``) and TensorBoard's ``add_histogram`` of every gradient. Every variant
runs its own copy of the same model; the variants take one step each in a shuffled order, again and
again, so drift of the machine hits them alike, and a cell is the median over repeats of (variant time /
plain time in the same repeat), with the spread (min-max over repeats) beside it.

Then: ``monitor.step()`` alone against one ``torch.nn.utils.clip_grad_norm_`` (which reads every gradient
once, as every training loop with clipping does), host syncs and host-to-device tensor creations between
flushes for every preset, and the resident memory of 10,000 steps under the full preset against a plain
run of the same model, each in a fresh process. Results go to BENCHMARKS.md (between the markers).

    python benchmarks/overhead.py            # full run (~15 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # a smoke run with few steps
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
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
from gradmedic._first_look import FIRST_LOOKS  # noqa: E402
from tests.helpers import aten_host_reads, count_host_syncs  # noqa: E402

console = Console()
Workload = tuple[nn.Module, Callable[[], tuple], Callable]


# --- workloads ------------------------------------------------------------------------------------
def tanh_mlp(widths: list[int], batch: int) -> Workload:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    return nn.Sequential(*layers[:-1]), lambda: (x, y), nn.functional.cross_entropy


def mlp() -> Workload:
    return tanh_mlp([784] + [512] * 8 + [10], 128)


def cnn() -> Workload:
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


def lstm() -> Workload:
    x, y = torch.randn(64, 50, 32), torch.randint(0, 10, (64,))
    return LSTMNet(), lambda: (x, y), nn.functional.cross_entropy


class GPT2(nn.Module):
    """transformers' GPT2LMHeadModel, returning logits (the loss is taken outside, like the other workloads)."""

    def __init__(self, vocab: int):
        super().__init__()
        import transformers

        config = transformers.GPT2Config(n_layer=12, n_embd=256, n_head=4, n_positions=128, vocab_size=vocab,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        self.lm = transformers.GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def gpt2() -> Workload:
    vocab = 4096  # GPT-2's own 50257 would make the LM head most of the step on a CPU
    ids = torch.randint(0, vocab, (8, 128))

    def loss(logits, target):
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), target[:, 1:].reshape(-1))

    return GPT2(vocab), lambda: (ids, ids), loss


def depth(n: int) -> Callable[[], Workload]:
    return lambda: tanh_mlp([256] * (n + 1) + [10], 64)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "MLP 784-512x8-10 tanh, batch 128": mlp,
    "CNN 6 conv BN/ReLU 28x28, batch 64": cnn,
    "LSTM 2x256, T=50, batch 64": lstm,
    "GPT-2 12x256 (vocab 4096), batch 8, T=128": gpt2,
    "MLP 256 wide, depth 10, batch 64": depth(10),
    "MLP 256 wide, depth 50, batch 64": depth(50),
    "MLP 256 wide, depth 200, batch 64": depth(200),
}


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


class TensorBoardHistograms:
    """``SummaryWriter.add_histogram`` of every parameter's gradient at every step (the usual recipe)."""

    def __init__(self, model: nn.Module, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.model = model
        self.writer = SummaryWriter(logdir)
        self.step_count = 0

    def step(self, loss=None) -> None:
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                self.writer.add_histogram(f"grad/{name}", p.grad, self.step_count)
        self.step_count += 1

    def close(self) -> None:
        self.writer.close()


VARIANTS = ("plain", "control", "cheap", "standard", "full", "lightning", "wandb", "tensorboard")
REFERENCES = {"lightning": "Lightning `grad_norm`", "wandb": "wandb-style hook",
              "tensorboard": "TensorBoard histograms"}


def make_watcher(variant: str, model: nn.Module, opt: torch.optim.Optimizer, logdir: str):
    if variant in ("plain", "control"):
        return None
    if variant == "lightning":
        return LightningGradNorm(model)
    if variant == "wandb":
        return WandbHistograms(model)
    if variant == "tensorboard":
        return TensorBoardHistograms(model, f"{logdir}/{id(model)}")
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


WARM_UP = max(FIRST_LOOKS) + 1


def time_workload(build, repeats: int, steps: int, progress, task, logdir: str) -> dict[str, list[float]]:
    torch.manual_seed(0)
    base, batch, loss_fn = build()
    runs = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        runs[variant] = (model, opt, make_watcher(variant, model, opt, logdir))
    # warm-up, not timed: past the Monitor's first looks (the update ratio at steps 1, 3, 7 and 15 and a flush after
    # each: a start-up cost of a run, not a step's; gradmedic/_first_look.py)
    for model, opt, watcher in runs.values():
        run_steps(model, opt, batch, loss_fn, watcher, WARM_UP)
    # about half a second of each variant per repeat: fewer steps for the slow workloads, at least 3
    model, opt, _ = runs["plain"]
    steps = max(3, min(steps, int(0.5 * 3 / run_steps(model, opt, batch, loss_fn, None, 3))))  # 3 steps: one is noisy
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
        progress.advance(task)
        for variant in VARIANTS:
            ratios[variant].append(times[variant] / times["plain"])
        ratios.setdefault("_plain_ms", []).append(1000 * times["plain"] / steps)
        ratios.setdefault("_steps", []).append(steps)
    for _, _, watcher in runs.values():
        if hasattr(watcher, "close"):
            watcher.close()
    return ratios


def step_against_clip(build, steps: int) -> dict[str, float]:
    """Median time of ``monitor.step()`` (preset full) and of one ``clip_grad_norm_`` after the same backward,
    both timed at every step (their order alternating), flushes included."""
    torch.manual_seed(0)
    model, batch, loss_fn = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    monitor = gm.Monitor(model, opt, preset="full")
    step_t, clip_t = [], []
    for i in range(steps + 5):
        x, y = batch()
        loss = loss_fn(model(x), y)
        loss.backward()
        for what in (("step", "clip") if i % 2 else ("clip", "step")):
            start = time.perf_counter()
            if what == "step":
                monitor.step(loss)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            (step_t if what == "step" else clip_t).append(time.perf_counter() - start)
        opt.step()
        opt.zero_grad(set_to_none=True)
    monitor.close()
    step_ms, clip_ms = statistics.median(step_t[5:]) * 1e3, statistics.median(clip_t[5:]) * 1e3
    return {"step_ms": step_ms, "clip_ms": clip_ms, "ratio": step_ms / clip_ms}


# --- host syncs and memory ------------------------------------------------------------------------
def longest_period(monitor: gm.Monitor) -> int:
    """Steps after which every probe of ``monitor`` has measured again, the recurrent horizon's period too."""
    return max(p.every * getattr(p, "horizon_every", 1) for p in monitor.probes)


def count_syncs(build, preset: str) -> dict[str, int]:
    """Host syncs and host-to-device creations made by gradmedic: at the first measured step (index tensors
    built once), over later steps until each probe has measured at least twice more, and at the flush."""
    torch.manual_seed(0)
    model, batch, loss_fn = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    # no scheduled flush inside the 5 x longest + 1 steps counted; 1000 stays within the device-buffer budget of the
    # largest workload (GPT-2's 165 layers allow 7530; 10,000 was refused there)
    monitor = gm.Monitor(model, opt, preset=preset, flush_every=1000)
    longest = longest_period(monitor)
    if 5 * longest + 1 >= monitor.flush_every:
        raise SystemExit(f"count_syncs: a probe period of {longest} steps needs flush_every above {5 * longest + 1}")
    with count_host_syncs() as first:  # and the first looks' flushes (steps 1, 3, 7, 15: gradmedic._first_look)
        run_steps(model, opt, batch, loss_fn, monitor, max(longest + 1, WARM_UP))
    with count_host_syncs() as between:
        run_steps(model, opt, batch, loss_fn, monitor, 2 * longest)
    with count_host_syncs() as at_flush:
        monitor.flush()
    # reads inside torch's operators (count_host_syncs sees Python calls only): the same steps monitored and on a
    # plain copy of the model; the user's own loop (Adam's step count) makes some in both
    torch.manual_seed(0)
    twin, _, _ = build()
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-4)
    run_steps(twin, twin_opt, batch, loss_fn, None, max(longest + 1, WARM_UP))
    inside = (aten_host_reads(lambda: run_steps(model, opt, batch, loss_fn, monitor, 2 * longest))
              - aten_host_reads(lambda: run_steps(twin, twin_opt, batch, loss_fn, None, 2 * longest)))
    monitor.close()
    return {"first": sum(first.values()), "between": sum(between.values()), "at_flush": sum(at_flush.values()),
            "steps": 2 * longest, "inside": inside}


MEMORY_CHILD = """
import gc, json, resource, sys, torch
sys.path.insert(0, {root!r})
import gradmedic as gm
from benchmarks.overhead import rss_mb, tanh_mlp, run_steps
torch.set_num_threads(1)
torch.manual_seed(0)
model, batch, loss_fn = tanh_mlp([64] * 9 + [10], 32)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
monitor = gm.Monitor(model, opt, preset={preset!r}) if {preset!r} != "plain" else None
samples = []
every = max({steps} // 20, 1)
for done in range(0, {steps}, every):
    run_steps(model, opt, batch, loss_fn, monitor, every)
    gc.collect()
    kept = monitor.trace.nbytes if monitor is not None else 0
    samples.append((done + every, rss_mb(), kept / 2**20))
print(json.dumps(samples))
"""


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_over_steps(preset: str, steps: int) -> list[tuple[int, float, float]]:
    """(step, RSS MB, trace MB) at 20 points of ``steps`` steps of a small MLP, in a fresh process."""
    code = MEMORY_CHILD.format(root=str(ROOT), preset=preset, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return [tuple(s) for s in json.loads(out.stdout.strip().splitlines()[-1])]


# --- report -----------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps: check the script, not the numbers")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=80, help="steps per variant per repeat (at most ~0.5 s of each)")
    parser.add_argument("--memory-steps", type=int, default=10_000)
    parser.add_argument("--only", default=None, help="time only workloads whose name contains this")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.memory_steps = 2, 2, 200
    torch.set_num_threads(1)
    workloads = {k: v for k, v in WORKLOADS.items() if args.only is None or args.only in k}

    results = {}
    with tempfile.TemporaryDirectory() as logdir, Progress(console=console) as progress:
        for name, build in workloads.items():
            task = progress.add_task(name, total=args.repeats)
            results[name] = time_workload(build, args.repeats, args.steps, progress, task, logdir)
    clip = {name: step_against_clip(WORKLOADS[name], 12 if args.quick else 200)
            for name in ("MLP 256 wide, depth 10, batch 64", "MLP 256 wide, depth 50, batch 64",
                         "MLP 784-512x8-10 tanh, batch 128")}
    # every preset on the three small workloads; GPT-2 (a second a step here) under the full preset only
    syncs = {(name, preset): count_syncs(build, preset) for name, build in list(WORKLOADS.items())[:4]
             for preset in ("cheap", "standard", "full") if preset == "full" or not name.startswith("GPT-2")}
    with Progress(console=console) as progress:
        task = progress.add_task(f"memory, {args.memory_steps} steps", total=2)
        memory = {}
        for preset in ("plain", "full"):
            memory[preset] = memory_over_steps(preset, args.memory_steps)
            progress.advance(task)

    table = Table(title="Training step time, median ratio to plain (min-max over repeats)")
    table.add_column("workload")
    table.add_column("plain ms/step", justify="right")
    for v in VARIANTS[1:]:
        table.add_column(v, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{statistics.median(r['_plain_ms']):.1f}", *(spread(r[v]) for v in VARIANTS[1:]))
    console.print(table)
    console.print(f"monitor.step() against clip_grad_norm_: {clip}")
    console.print(f"host syncs: {syncs}")
    console.print(f"memory: plain {memory['plain'][-1]}, full {memory['full'][-1]}")
    write_markdown(Path(args.out), args, results, clip, syncs, memory)


MARK_BEGIN = "<!-- overhead:begin -->"
MARK_END = "<!-- overhead:end -->"


def write_markdown(path: Path, args, results, clip, syncs, memory) -> None:
    cpu = platform.processor() or platform.machine()
    lines = [MARK_BEGIN, "## Monitor overhead (`benchmarks/overhead.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {cpu} ({platform.system()}), 1 torch thread, torch "
             f"{torch.__version__}, CPU (no GPU was lent to this task: the CUDA checks below are not yet run). "
             f"{args.repeats} repeats of up to {args.steps} Adam steps per variant (about half a second of each, "
             f"at least 3: the steps column), after {WARM_UP} untimed steps of each (past the Monitor's first looks, "
             "a start-up cost of a run), the variants interleaved step by step "
             "in a shuffled order; a cell is the median over repeats of (variant time / plain time in the same "
             "repeat), with the lowest and highest repeat in brackets. `control` is a second plain copy: how far "
             "apart two identical runs read.", "",
             "| workload | steps | plain ms/step | control | cheap | standard (default) | full | "
             + " | ".join(REFERENCES.values()) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(REFERENCES)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['_steps'][0]} | {statistics.median(r['_plain_ms']):.1f} | "
                     + " | ".join(spread(r[v]) for v in VARIANTS[1:]) + " |")
    lines += ["", "Targets: standard within the control's noise of 1, full <= 1.25. The reference styles run "
              "at every step, as the full preset does.", "",
              "**`monitor.step()` against one `clip_grad_norm_`** (preset full; each timed at every one of 200 "
              "steps after the same backward, in alternating order; medians; flushes included):", "",
              "| workload | `monitor.step()` ms | `clip_grad_norm_` ms | ratio |", "|---|---:|---:|---:|"]
    for name, c in clip.items():
        lines.append(f"| {name} | {c['step_ms']:.2f} | {c['clip_ms']:.2f} | {c['ratio']:.2f} |")
    lines += ["", "**Host syncs and host-to-device tensor creations made by gradmedic** (`.item()`, `.cpu()`, "
              "`.tolist()`, `.numpy()`, `bool/float/int(tensor)`, `.nonzero()`, and tensors made from host "
              "data: `torch.tensor`, `torch.as_tensor`, `torch.from_numpy`, `new_tensor`, a Python number written "
              "with `t[i] = x` or `fill_(x)`; counted by `tests/helpers.py:count_host_syncs`, which wraps those "
              "calls and counts the ones whose caller is in the `gradmedic` package). The first measured steps "
              "build the probes' index tensors once and hold the first looks' four flushes (steps 1, 3, 7 and 15); "
              "'between flushes' covers enough later steps that every "
              "probe of the preset measures at least twice. The last column counts values read to the host "
              "inside torch's own operators over the same number of steps (`aten::_local_scalar_dense` in the "
              "profiler, `tests/helpers.py:aten_host_reads`), monitored minus a plain copy of the same loop:", "",
              "| workload | preset | first steps | later steps, between flushes | at the flush "
              "| inside operators, between flushes |",
              "|---|---|---:|---:|---:|---:|"]
    for (name, preset), s in syncs.items():
        lines.append(f"| {name} | {preset} | {s['first']} | {s['between']} ({s['steps']} steps) | {s['at_flush']} "
                     f"| {s['inside']} |")
    plain, full = memory["plain"], memory["full"]
    growth = (full[-1][1] - full[0][1]) - (plain[-1][1] - plain[0][1])
    kept = full[-1][2] - full[0][2]
    lines += ["", f"**Memory over {args.memory_steps:,} steps** of a 9x64 tanh MLP (batch 32), plain and under the "
              "full preset, each in a fresh process: resident set size, and the trace's own data (`Trace.nbytes`: "
              "the numbers the user asked for). From the first sample to the last, the full run's RSS grew "
              f"{growth:+.1f} MB more than the plain run's, while its trace grew {kept:.1f} MB.", "",
              "| step | plain RSS MB | full RSS MB | full trace MB |", "|---:|---:|---:|---:|"]
    for (step, rss_p, _), (_, rss_f, trace_mb) in list(zip(plain, full, strict=True))[::4] + [(plain[-1], full[-1])]:
        lines.append(f"| {step} | {rss_p:.1f} | {rss_f:.1f} | {trace_mb:.2f} |")
    lines.append(MARK_END)
    replace_section(path, MARK_BEGIN, MARK_END, "\n".join(lines) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    gc.collect()
    main()
