"""The Monitor's first looks at a run: the first optimizer steps' updates, measured and diagnosed at once.

A learning rate too hot for the model shows in its first update, before the loss does anything: a plain-SGD run at
lr 3.0 changes its layers by 0.39 of their size at step 1 and diverges at step 3 (the issue-26 corpus's
high_lr_no_warmup_mlp); one at 0.5 by 0.16 at step 1 and diverges at 21. At the default cadence the update ratio is
first measured at step 20 and said at the first flush (step 99), after both failures. So the probes that measure
the update ratio also measure it at the FIRST_LOOKS steps, and the Monitor flushes and diagnoses right after each:
four more measurements and four more flushes per run, all in its first 16 steps. Whether an early update is judged
is the rule's business (``update_too_large``: plain SGD's first updates are a rate, Adam's are a transient)."""

from __future__ import annotations

from typing import Any

from torch import nn

from gradmedic.architecture import class_name, unwrap
from gradmedic.probes import LayerIndex, Probe

__all__ = ["FIRST_LOOKS", "ask_for_first_looks", "run_meta"]

# The steps whose update is read early: W_1 - W_0 is the first optimizer step (step 0 has no update to read), then
# doubling, since a too-hot lr's step grows step over step while a healthy one's shrinks with its gradient: the
# corpus's hot CNN's median layer changes by 0.05 of its size at step 1, 0.14 at 3 and 0.22 at 7 (diverged at 21),
# its healthy SGD runs' by 0.003 or less and falling.
FIRST_LOOKS = (1, 3, 7, 15)


def ask_for_first_looks(probes: list[Probe]) -> frozenset[int]:
    """Ask each probe that measures the update ratio to measure at the FIRST_LOOKS steps too; the step counts after
    which the Monitor flushes for them (empty: no probe reads an update, no early flush)."""
    asked = [p for p in probes if getattr(p, "update_ratio", False)]
    for probe in asked:
        for step in sorted(FIRST_LOOKS, reverse=True):  # also_at keeps the steps at or after the one it is given
            probe.also_at(step)
    return frozenset(step + 1 for step in FIRST_LOOKS) if asked else frozenset()


def optimizer_name(optimizer: Any) -> str | None:
    """The optimizer's class name, looked through a wrapper that holds the real one as ``.optimizer`` (Hugging Face
    accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer)."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner if hasattr(inner, "param_groups") else optimizer).__name__


def run_meta(model: nn.Module, optimizer: Any, layers: LayerIndex, preset: str, probes: list[Probe],
             torch_version: str) -> dict[str, Any]:
    """The trace's meta for a Monitor's run (TraceMeta's fields)."""
    params = {name: sum(p.numel() for p in ps) for name, ps in zip(layers.names, layers.params, strict=True) if ps}
    meta = {"model": type(unwrap(model)).__name__, "preset": preset, "modules": layers.names,
            "types": {n: class_name(m) for n, m in zip(layers.names, layers.modules, strict=True)},
            "params": params, "roles": dict(layers.roles), "dtype": str(layers.param_dtype).removeprefix("torch."),
            "device": str(layers.device), "probes": [repr(p) for p in probes], "torch": torch_version}
    name = optimizer_name(optimizer)
    if name is not None:
        meta["optimizer"] = name
    return meta
