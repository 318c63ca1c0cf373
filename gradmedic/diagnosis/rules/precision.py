"""The rules of numbers: a NaN/Inf and where it was born, and gradients that flushed to zero in 16 bits."""

from __future__ import annotations

import math

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import depth_order, finding, latest, per_layer_share
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.diagnosis.rules.depth import zero_gradient
from gradmedic.trace import Trace

__all__ = ["gradient_underflow", "nonfinite"]

# --- precision -------------------------------------------------------------------------------------
# Share of a float16/bfloat16 layer's gradient entries that are exactly zero. Half of them gone is
# underflow (Micikevicius et al. 2018 show most activation gradients of an fp16 SSD below 2^-24);
# 99% means the layer gets no gradient at all.
UNDERFLOW_WARNING = 0.5
UNDERFLOW_ERROR = 0.99



def nonfinite(trace: Trace, ctx: Context) -> list[Finding]:
    events = [e for e in trace.events if e.get("kind") == "nonfinite"]
    if events:
        first_step = min(e["step"] for e in events)
        at = [e for e in events if e["step"] == first_step]
        first = next((e for e in at if e["phase"] == "forward"), at[0])
        where = "output" if first["phase"] == "forward" else "output's gradient (in the backward pass)"
        return [finding("nonfinite", "error", [first["module"]],
                         f"The first {first['value'].upper()} appears in the {where} of '{first['module']}' "
                         f"at step {first_step}; everything after it is poisoned.",
                         {"step": first_step, "phase": first["phase"], "value": first["value"],
                          "events": len(events)}, ctx)]
    measured = latest(trace, "grad_norm")
    if measured is None:
        return []
    step, norms = measured
    bad = depth_order(trace, step, [k for k, v in norms.items() if not math.isfinite(v)])
    if not bad:
        return []
    return [finding("nonfinite", "error", bad, f"The gradient of '{bad[0]}' is not finite at step {step}.",
                     {"step": step}, ctx)]


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
