"""On a GPU: host syncs and host-to-device copies that gradmedic adds between flushes, as CUDA sees them.

For each workload of ``benchmarks/overhead.py`` and each preset, on ``cuda``:

1. **Syncs.** The steps run under ``torch.cuda.set_sync_debug_mode("warn")``; every warning torch raises for a
   synchronizing call is kept with the file that made the call, and those made from the ``gradmedic``
   package are counted (a plain training step of the workload may sync by itself: those are not ours).
2. **Host-to-device copies.** The same steps run under ``torch.profiler`` once plain and once monitored; the
   CUDA "Memcpy HtoD" activities of the two are counted, and the difference is what the Monitor added.

Steps are counted after a warm-up that covers each probe's first measured step (which builds its index
tensors once) and never include a flush (``flush_every`` is larger than the run). Without a CUDA device it
says so and exits 0: the CPU counter (``tests/helpers.py:count_host_syncs``) stands in for it there.

    python benchmarks/cuda_syncs.py [--steps N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmedic as gm  # noqa: E402
from benchmarks.overhead import WORKLOADS, longest_period, run_steps  # noqa: E402

PACKAGE = str(Path(gm.__file__).parent)


def _train(model, opt, batch, loss_fn, watcher, steps):
    x, y = batch()
    x, y = x.cuda(), y.cuda()
    return run_steps(model, opt, lambda: (x, y), loss_fn, watcher, steps)


def _htod_copies(model, opt, batch, loss_fn, watcher, steps) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _train(model, opt, batch, loss_fn, watcher, steps)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if "HtoD" in e.key)


def check(name: str, preset: str, steps: int) -> dict[str, int]:
    torch.manual_seed(0)
    base, batch, loss_fn = WORKLOADS[name]()
    base = base.cuda()
    runs = {}
    for variant in ("plain", preset):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        watcher = gm.Monitor(model, opt, preset=preset, flush_every=100_000) if variant != "plain" else None
        longest = longest_period(watcher) if watcher else 1
        _train(model, opt, batch, loss_fn, watcher, longest + 1)  # warm-up: index tensors are built once
        runs[variant] = (model, opt, batch, loss_fn, watcher, max(steps, 2 * longest))
    model, opt, batch, loss_fn, watcher, n = runs[preset]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, opt, batch, loss_fn, watcher, n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "synchroniz" in str(w.message) and w.filename.startswith(PACKAGE)]
    added = _htod_copies(*runs[preset]) - _htod_copies(*runs["plain"])
    watcher.close()
    return {"steps": n, "syncs_from_gradmedic": len(ours), "htod_copies_added": added}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device here: the CUDA sync and copy check was not run (the CPU counter in "
              "tests/helpers.py:count_host_syncs stands in for it).")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in list(WORKLOADS)[:4]:
        for preset in ("cheap", "standard", "full"):
            print(f"{name} | {preset} | {check(name, preset, args.steps)}")


if __name__ == "__main__":
    main()
