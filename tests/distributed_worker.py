"""One rank of a `torchrun --nproc_per_node=2` job (gloo, CPU), run by tests/test_distributed.py.

Usage: distributed_worker.py MODE OUTDIR, MODE one of ddp | fsdp | lag. Every rank trains the same
model on its half of a global batch under a Monitor; rank 0 also trains an unwrapped copy on the whole
batch, single-process, and records the reference numbers the combined trace must equal.
"""

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradmedic as gm
import gradmedic._distributed as gmdist

STEPS, FLUSH, BATCH, LR = 20, 5, 16, 0.05


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def layer_norms(model: nn.Module, attr: str) -> dict[str, float]:
    out = {}
    for name, module in model.named_modules():
        ps = [getattr(p, attr) if attr == "grad" else p for p in module.parameters(recurse=False)]
        if ps:
            out[name] = float(torch.cat([p.detach().flatten() for p in ps]).double().norm())
    return out


def main() -> None:
    mode, outdir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, 12, generator=gen) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (BATCH,), generator=gen) for _ in range(STEPS)]

    reference = build()
    model = build()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        wrapped = fully_shard(model)
    elif mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:  # "lag": no gradient all-reduce of the user's own, so a rank that leaves early stops nobody's step
        wrapped = model
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    if mode == "lag":
        gmdist.DEFAULT_TIMEOUT_S = 5.0  # so that the test waits seconds, not minutes

    collected: list[gm.GradmedicWarning] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gm.GradmedicWarning)
        monitor = gm.Monitor(wrapped, opt, preset="full", flush_every=FLUSH)
        # a second, local Monitor on the same model: each rank's own numbers, to check the combining rules
        local = gm.Monitor(wrapped, opt, preset="full", flush_every=FLUSH, distributed=False)
        ref = {"loss": [], "grad_norm": [], "weight_norm": []}
        for step in range(STEPS):
            if mode == "lag" and rank == 1 and step == 7:
                time.sleep(2 * gmdist.DEFAULT_TIMEOUT_S)  # lags past rank 0's flush at step 10, then dies
                sys.exit(0)  # rank 0 must neither hang nor fail: its Monitor times out, warns and goes on
            x, y = xs[step], ys[step]
            half = BATCH // world
            xr, yr = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
            loss = nn.functional.cross_entropy(wrapped(xr), yr)
            loss.backward()
            monitor.step(loss)
            local.step(loss)
            opt.step()
            opt.zero_grad()
            # the single-process reference on the whole batch: the same trajectory as the mean over ranks
            ref_loss = nn.functional.cross_entropy(reference(x), y)
            ref_loss.backward()
            ref["loss"].append(float(ref_loss))
            ref["grad_norm"].append(layer_norms(reference, "grad"))
            ref["weight_norm"].append(layer_norms(reference, "data"))
            ref_opt.step()
            ref_opt.zero_grad()
        monitor.close()
        local.close()
        collected = [w for w in caught if issubclass(w.category, gm.GradmedicWarning)]
    trace = monitor.trace
    own = {m: {x: [float(v) for v in local.trace.metric(m)[:, j]] for j, x in enumerate(local.trace.layers)}
           for m in ("backward_rms", "act_mean", "saturated_frac")}
    everyone = [None] * world
    if mode != "lag":
        dist.all_gather_object(everyone, own)
    saved = trace.save(outdir / "run.gmtrace")
    result = {
        "rank": rank, "saved": str(saved) if saved else None, "layers": trace.layers,
        "meta": trace.meta.get("distributed"), "warnings": [str(w.message) for w in collected],
        "steps": [int(s) for s in trace.steps], "reference": ref,
        "grad_norm": {name: [float(v) for v in trace.metric("grad_norm")[:, j]] for j, name in enumerate(trace.layers)},
        "weight_norm": {name: [float(v) for v in trace.metric("weight_norm")[:, j]]
                        for j, name in enumerate(trace.layers)},
        "loss": [float(v) for v in trace.scalar("loss")[1]],
        "combined": {m: {x: [float(v) for v in trace.metric(m)[:, j]] for j, x in enumerate(trace.layers)}
                     for m in ("backward_rms", "act_mean", "saturated_frac")},
        "per_rank": everyone,
    }
    (outdir / f"rank{rank}.json").write_text(json.dumps(result))
    if mode != "lag":
        dist.barrier()
    # torch 2.13's gloo sometimes aborts in process-group teardown at exit ("terminate called without an
    # active exception"), with or without gradmedic: the job's work is done and written, so skip teardown
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
