"""The rules of numbers: a NaN/Inf and where it was born, and gradients that flushed to zero in 16 bits."""

from __future__ import annotations

import dataclasses

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import depth_order, finding, per_layer_share, scalar_in_order
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.diagnosis.rules.depth import zero_gradient
from gradmedic.diagnosis.rules.training import DIVERGE_ERROR, SMOOTH, smoothed
from gradmedic.trace import Trace

__all__ = ["gradient_underflow", "nonfinite"]

# --- precision -------------------------------------------------------------------------------------
# Share of a float16/bfloat16 layer's gradient entries that are exactly zero. Half of them gone is
# underflow (Micikevicius et al. 2018 show most activation gradients of an fp16 SSD below 2^-24);
# 99% means the layer gets no gradient at all.
UNDERFLOW_WARNING = 0.5
UNDERFLOW_ERROR = 0.99

# --- a NaN/Inf that comes at once ------------------------------------------------------------------
# A loss that was steady until it went non-finite (its last SMOOTH-step median within divergence's error factor,
# 1.5x, of its best SMOOTH-step median: it had not given back what it learned) came at once: a bad batch (an inf in
# the data), a singular operation (log 0, sqrt at 0, a division by a zero norm) or an overflow, not a learning rate
# that drove the loss up first. There a lower lr or clipping does not help; skipping the batch (and rewinding if the
# weights took it) and guarding the operation do. PaLM's spikes were skipped that way (Chowdhery et al. 2022); the
# issue-26 corpus's NaN from the data comes at step 40 of a loss falling steadily. Fewer than SUDDEN_HISTORY finite
# losses before it are too few to tell.
SUDDEN_FACTOR = DIVERGE_ERROR[1]
SUDDEN_HISTORY = 2 * SMOOTH
SUDDEN_REMEDIES = ["skip_and_rewind", "numerical_guard", "gradcheck"]



def nonfinite(trace: Trace, ctx: Context) -> list[Finding]:
    """The first step at which anything was NaN or infinite: the loss (recorded at every step), a layer's gradient
    at a measured step, or an output the NaN/Inf probe saw (which also names the module it was born in). Everything
    after that step is poisoned, so the first one is what to look at."""
    events = sorted((e for e in trace.events if e.get("kind") == "nonfinite"), key=lambda e: e["step"])
    loss = _first_nonfinite_loss(trace)
    grad = _first_nonfinite_gradient(trace)
    firsts = [s for s in (loss[0] if loss else None, grad[0] if grad else None, events[0]["step"] if events else None)
              if s is not None]
    if not firsts:
        return []
    first_step = min(firsts)
    evidence: dict = {"step": first_step}
    said_loss = ""
    if loss is not None:
        evidence.update(loss_step=loss[0], loss_value=loss[1], nonfinite_losses=loss[2])
        if loss[0] == first_step:
            said_loss = f"The loss is {loss[1]} from step {loss[0]} ({loss[2]} non-finite loss(es) recorded). "
    if events:
        at = [e for e in events if e["step"] == events[0]["step"]]
        first = next((e for e in at if e["phase"] == "input"), None) or \
            next((e for e in at if e["phase"] == "forward"), at[0])
        where = "output" if first["phase"] == "forward" else "output's gradient (in the backward pass)"
        evidence.update(phase=first["phase"], value=first["value"], events=len(events), probe_step=first["step"])
        late = ""
        if first["step"] > first_step:  # the probe looked after the first NaN: the weights may carry it by then
            late = (f" (the probe looked after the NaN of step {first_step}, when the weights may carry it: where it "
                    "shows first, not necessarily where it was born)")
        if first["phase"] == "input":  # the batch itself: no module made it
            found = finding("nonfinite", "error", [], f"{said_loss}The model's input holds {first['value'].upper()} "
                            f"at step {first['step']}: it comes with the batch (the data, or what prepares it), not "
                            "from a module; skip such batches, and find where the data pipeline makes them.",
                            evidence, ctx)
            return [dataclasses.replace(found, remedies=list(SUDDEN_REMEDIES[:1]))]
        found = finding("nonfinite", "error", [first["module"]],
                        f"{said_loss}The first {first['value'].upper()} the NaN/Inf probe saw is in the {where} of "
                        f"'{first['module']}' at step {first['step']}{late}; everything after it is poisoned.",
                        evidence, ctx)
    elif grad is not None and grad[0] == first_step:
        found = finding("nonfinite", "error", grad[1], f"{said_loss}The gradient of '{grad[1][0]}' is not finite at "
                        f"step {grad[0]}.", {**evidence, "gradient_step": grad[0]}, ctx)
    else:
        found = finding("nonfinite", "error", grad[1] if grad is not None else [], f"{said_loss}No probe was "
                        "measuring at that step to say which module made it: the NaN/Inf probe looks at the next step "
                        "it runs (preset='full' or every=1 looks at every step).", evidence, ctx)
    return [_if_sudden(found, trace, first_step, ctx)]


def _if_sudden(found: Finding, trace: Trace, first_step: int, ctx: Context) -> Finding:
    """The finding as it is, or, where the loss was steady until the first NaN (SUDDEN_FACTOR), said so and with the
    remedies of a NaN that came at once first (SUDDEN_REMEDIES; loss scaling before them in 16 bits)."""
    loss = scalar_in_order(trace, "loss")
    if loss is None:
        return found
    before = loss[1][loss[0] < first_step]
    before = before[np.isfinite(before)]
    if before.size < SUDDEN_HISTORY:
        return found
    smooth = smoothed(before)[SMOOTH - 1:]  # the running median of the steady part, divergence's smoothing
    if not smooth[-1] <= SUDDEN_FACTOR * smooth.min():
        return found  # the loss rose first: a learning rate or an instability drove it (divergence's remedies)
    remedies = (["loss_scaling"] if ctx.low_precision else []) + SUDDEN_REMEDIES
    message = (f"{found.message} The loss was steady until step {first_step} ({smooth[-1]:.3g} over the {SMOOTH} "
               f"steps before, its best {SMOOTH}-step median {smooth.min():.3g}): the NaN came at once, from a bad "
               "batch (an inf or NaN in the data), a singular operation (log 0, sqrt at 0, a division by a zero norm) "
               "or an overflow, not from a learning rate that drove the loss up; skip that batch (rewind if the "
               "weights took it) and guard the step.")
    return dataclasses.replace(found, message=message, remedies=remedies,
                               evidence={**found.evidence, "sudden": True, "loss_before": float(smooth[-1])})


def _first_nonfinite_loss(trace: Trace) -> tuple[int, str, int] | None:
    """(the first step whose loss is NaN or infinite, "NaN"/"inf"/"-inf", how many such steps), or None."""
    if "loss" not in trace.scalar_names:
        return None
    steps, values = trace.scalar("loss")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return None
    first = bad[np.argmin(steps[bad])]
    return int(steps[first]), str(float(values[first])).replace("nan", "NaN"), int(bad.size)


def _first_nonfinite_gradient(trace: Trace) -> tuple[int, list[str]] | None:
    """(the first measured step at which some layer's gradient norm is not finite, those layers), or None."""
    if "grad_norm" not in trace.metrics:
        return None
    grads = trace.metric("grad_norm")
    # NaN in the grid means "not measured", and a NaN gradient norm is stored as NaN too: a layer whose weight norm
    # was measured at the step (the probe writes both together) but whose gradient norm is NaN had a NaN gradient
    measured = ~np.isnan(trace.metric("weight_norm")) if "weight_norm" in trace.metrics else np.zeros_like(grads, bool)
    with np.errstate(invalid="ignore"):
        bad = np.isinf(grads) | (measured & np.isnan(grads))
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size == 0:
        return None
    s = int(rows[0])
    layers = [layer for j, layer in enumerate(trace.layers) if bad[s, j]]
    return int(trace.steps[s]), depth_order(trace, int(trace.steps[s]), layers)


def gradient_underflow(trace: Trace, ctx: Context) -> list[Finding]:
    """Exact zeros in the gradients of a model whose backward runs in 16 bits (half weights, or autocast).
    Zeros that are structure (an embedding's unused rows) are not counted (probes.gradients)."""
    if not ctx.low_precision:
        return []
    zero = [f for f in zero_gradient(trace, ctx) if f.kind == "gradient_underflow"]
    if zero:
        return zero
    dtype = "autocast" if ctx.autocast else trace.meta.get("dtype")
    return per_layer_share(trace, "grad_zero_frac", "gradient_underflow", UNDERFLOW_WARNING, UNDERFLOW_WARNING,
                            UNDERFLOW_ERROR, lambda k, v: f"{100 * v:.0f}% of the {dtype} "
                            f"gradient entries of '{k}' are exactly zero: they flushed to zero", ctx)


# --- remedies, ranked --------------------------------------------------------------------------------
def rank_nonfinite(ctx: Context) -> list[str]:
    ids = ["numerical_guard", "gradcheck", "lower_learning_rate", "clip_grad_norm"]
    if ctx.low_precision:
        ids.insert(1, "loss_scaling")
    return ids


def rank_underflow(ctx: Context) -> list[str]:
    return ["loss_scaling", "higher_precision"]


register(Rule("nonfinite", nonfinite, rank_nonfinite, {None: ("numerical_guard", "lr_warmup", "qk_norm")}))
register(Rule("gradient_underflow", gradient_underflow, rank_underflow))
