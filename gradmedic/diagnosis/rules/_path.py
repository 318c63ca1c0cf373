"""Where the gradient's path runs through a model, for the depth rules (issue 28): the layers that are no point on
it, grad/weight against a floored weight, and a residual stream's grad/weight against its head's."""

from __future__ import annotations

import math

import numpy as np

from gradmedic.diagnosis.rules._common import first_measured, latest
from gradmedic.trace import Trace

__all__ = ["floored", "off_path", "stream_under_head"]


def off_path(trace: Trace) -> set[str]:
    """Layers that are no point on the path the gradient takes through a plain (block-free) model, so neither in its
    depth profile nor in its reference (issue 28): layers whose output reaches the loss only through a softmax
    (``meta["scoring"]``: attention scores, small at init by design), parallel heads and their side branches
    (``meta["branches"]``: NeRF's density head and colour branch; the trunk feeding both is the chain), layers
    the user's optimizer does not hold
    (``meta["optimized"]``: a GAN's discriminator in the generator's step does not learn there, so it is not what
    the generator's layers are compared with), and a module that owns parameters itself and also calls
    parameterised children (BERT's LM head owning its zero bias beside its bias-free decoder): its own parameters
    add to the output its children compute, they are no layer of the chain, and a zero-initialised one has a
    grad/weight as large as it likes after a few steps."""
    meta = trace.meta
    owners = [k for k, n in meta.get("params", {}).items() if n]
    containers = {k for k in owners if any(o != k and (k == "" or o.startswith(k + ".")) for o in owners)}
    off = set(meta.get("scoring", ())) | set(meta.get("branches", ())) | containers
    optimized = meta.get("optimized")
    if optimized is not None:
        off |= set(trace.layers) - set(optimized)
    return off


def floored(trace: Trace, gw: dict[str, float], floor: float) -> dict[str, float]:
    """grad/weight with each weight norm raised to ``floor`` of the model's typical weight per element (the median
    over its layers of weight_norm / sqrt(parameters))."""
    grads, weights = latest(trace, "grad_norm"), latest(trace, "weight_norm")
    params = trace.meta.get("params", {})
    if grads is None or weights is None:
        return gw
    rms = {k: w / math.sqrt(params[k]) for k, w in weights[1].items() if params.get(k) and w > 0 and math.isfinite(w)}
    if len(rms) < 2:
        return gw
    floor = floor * float(np.median(list(rms.values())))
    out = dict(gw)
    for k, r in rms.items():
        if k in out and r < floor and grads[1].get(k, math.nan) > 0:
            out[k] = grads[1][k] / (floor * math.sqrt(params[k]))
    return out


def stream_under_head(trace: Trace, blocks: list[str], floor: float) -> float | None:
    """The median over the blocks of their largest grad/weight, over the head's median (the head's
    weights floored at ``floor``, see ``floored``); None without a head."""
    ratio = latest(trace, "grad_to_weight")
    if ratio is None or "forward_index" not in trace.metrics:
        return None
    order = trace.last("forward_index")
    last = max((order.get(k, -math.inf) for k in blocks), default=-math.inf)
    roles = trace.meta.get("roles", {})
    # the head's grad/weight against a floored weight (``floor``), and not of a zero-initialised layer (a
    # diffusion U-Net's output conv, grown from zero for a few steps, has grad/weight 59 by design)
    first = first_measured(trace, "weight_norm")
    zero_init = {k for k, w in (first[1] if first else {}).items() if w == 0}
    head = [v for k, v in floored(trace, ratio[1], floor).items()
            if k and k not in zero_init and order.get(k, -math.inf) > last and v > 0 and math.isfinite(v)
            and roles.get(k) not in ("norm", "block") and not any(k.startswith(b + ".") for b in blocks)]
    # each block by its fastest-learning layer, its norms included: a branch scaled by design (LayerScale 1e-6 in
    # ConvNeXt: its layers read 3e-8; ReZero's 0; a zero-initialised last norm gamma) has a fast gamma (infinitely
    # fast from zero), so a block learns slowly only when every one of its layers does
    grads, weights = latest(trace, "grad_norm"), latest(trace, "weight_norm")
    fast = dict(ratio[1])
    for k, w in (weights[1] if weights and grads else {}).items():
        if w == 0 and grads[1].get(k, 0) > 0:  # type: ignore[index]
            fast[k] = math.inf  # a gate at zero that gets a gradient (ReZero's alpha): it moves from nothing
    stream = [max(members) for b in blocks if (members := [
        v for k, v in fast.items() if (k == b or k.startswith(b + ".")) and not math.isnan(v)])]
    if not head or not stream:
        return None
    return float(np.median(stream) / np.median(head))
