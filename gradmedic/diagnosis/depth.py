"""The depth rules: vanishing and exploding gradients, read along the path the gradient takes.

Where a model has residual blocks (``gradmedic.architecture.stream_blocks``), the profile is the gradient
reaching each block's output: the residual stream, the path the gradient takes through depth. Layers
inside a block are its branch: LayerScale (1e-6 in ConvNeXt), ReZero (0), a zero-initialised last BN
gamma, small q/k projections (near-uniform attention) all scale a branch's gradient down by design, so
the branch's own layers are not compared with the deepest layers. Without blocks (a plain MLP or CNN)
every parameterised layer is on the path and the profile reads them all, in the order they ran.
The profile rules compare each entry with those nearest the loss, so they do not depend on the loss's
scale, the batch size or the learning rate.
"""

from __future__ import annotations

import math

import numpy as np

from gradmedic.diagnosis._common import depth_order, finding, latest, severity_of
from gradmedic.diagnosis.findings import Finding
from gradmedic.trace import Trace

__all__ = ["exploding_gradients", "vanishing_gradients", "zero_gradient"]

# --- depth profile ---------------------------------------------------------------------------------
# A layer whose gradient (as backward signal RMS *and* as grad/weight, the speed it learns at) is 100x
# below the last layer's: Nielsen's 4-hidden-layer sigmoid net, whose first layer learns ~100x slower
# than its last. Both measures must agree: RMS per element alone falls in healthy CNNs whose early maps
# have many more elements, and grad/weight alone misleads on zero- or tiny-weight layers.
VANISHING_WARNING = 1e-2
# 1e-5: at a learning rate that suits the last layer the first one would need 10^5 times more steps.
VANISHING_ERROR = 1e-5
# Growth toward the input, the mirror image: 100x is a warning, 10^5 an error.
EXPLODING_WARNING = 1e2
EXPLODING_ERROR = 1e5
# A gradient 10x the weight it updates: an SGD step at lr 0.1 replaces the layer wholesale. Healthy
# layers sit at 1e-4..1e-1; this catches nets whose forward signal explodes, so that their gradients are
# huge but flat across depth (large deltas times small inputs early, small deltas times large inputs late).
GRAD_TO_WEIGHT_EXPLODING = 10.0
GRAD_TO_WEIGHT_EXPLODING_ERROR = 1e4  # no learning rate that suits any other layer can train this one
# The reference for a depth profile: the median over the deepest quarter of the layers, so that a small,
# special head (a 16x10 classifier after global pooling) does not set the scale for everything else.
REFERENCE_FRACTION = 0.25
# Over a run: the total gradient norm growing 1000x from its first measurement.
RUN_GROWTH_WARNING = 1e3
RUN_GROWTH_ERROR = 1e6
# Through a residual stream only the backward signal is read (grad/weight of a block mixes every branch,
# each scaled by design); the thresholds are the same factors of the deepest blocks' signal.



def _profile(trace: Trace) -> tuple[int, list[str], np.ndarray, np.ndarray, str] | None:
    """(step, layers or blocks in depth order, signal and grad/weight relative to the deepest, "blocks"
    or "layers").

    The backward signal here is the norm of dL/d(output) over the whole tensor: its RMS per element
    falls with the number of elements, so early conv maps with many positions would look vanished.
    """
    signal = latest(trace, "backward_norm")
    ratio = latest(trace, "grad_to_weight")
    if signal is None or ratio is None:
        return None
    step, bs = signal
    roles = trace.meta.get("roles", {})
    blocks = depth_order(trace, step, [k for k, r in roles.items() if r == "block" and k in bs
                                       and math.isfinite(bs[k])])
    if len(blocks) >= 2:
        b = np.array([bs[k] for k in blocks])
        deep = max(1, math.ceil(REFERENCE_FRACTION * len(blocks)))
        reference = np.median(b[-deep:])
        if reference <= 0:
            return None  # no gradient at all: zero_gradient's case
        b = b / reference
        return step, blocks, b, b, "blocks"
    gw = {k: v for k, v in ratio[1].items() if v > 0 and math.isfinite(v)}
    layers = depth_order(trace, step, [k for k in bs if k in gw and bs[k] > 0])
    if len(layers) < 2:
        return None
    b = np.array([bs[k] for k in layers])
    g = np.array([gw[k] for k in layers])
    deep = max(1, math.ceil(REFERENCE_FRACTION * len(layers)))
    return step, layers, b / np.median(b[-deep:]), g / np.median(g[-deep:]), "layers"


def zero_gradient(trace: Trace, ctx: dict) -> list[Finding]:
    """Every measured layer's gradient is exactly zero: nothing can learn. In 16 bits (a half model or
    autocast) that is underflow (a tiny loss); in float32 a loss that does not depend on the outputs."""
    measured = latest(trace, "grad_norm")
    if measured is None or not measured[1] or any(v != 0 for v in measured[1].values()):
        return []
    step, norms = measured
    layers = depth_order(trace, step, list(norms))
    evidence = {"step": step, "layers": len(layers), "zero_everywhere": True}
    if ctx.get("low_precision"):
        how = "under autocast" if ctx.get("autocast") else "in 16 bits"
        return [finding("gradient_underflow", "error", layers,
                        f"Every gradient is exactly zero {how}: the backward underflowed to zero before it reached "
                        f"any parameter ({len(layers)} layers); scale the loss up.", evidence, ctx)]
    return [finding("vanishing_gradients", "error", layers,
                    f"Every gradient is exactly zero ({len(layers)} layers): the loss does not change with any "
                    "parameter (a loss multiplied by 0, detached outputs, or a constant).", evidence, ctx)]


def vanishing_gradients(trace: Trace, ctx: dict) -> list[Finding]:
    zero = zero_gradient(trace, ctx)
    if zero:
        return [f for f in zero if f.kind == "vanishing_gradients"]
    profile = _profile(trace)
    if profile is None:
        return []
    step, layers, b, g, unit = profile
    both = np.maximum(b, g)  # a layer vanishes when both measures have fallen
    hit = [k for k, v in zip(layers, both, strict=True) if v < VANISHING_WARNING]
    if not hit:
        return []
    worst = float(both.min())
    severity = severity_of(worst, VANISHING_WARNING, VANISHING_ERROR)
    assert severity is not None
    gains = np.diff(np.log10(np.maximum(both, 1e-300)))
    drop_at = layers[int(np.argmin(gains)) + 1] if len(gains) else layers[0]
    acts = ", ".join(ctx.get("activations", [])) or "its"
    if unit == "blocks":
        message = (f"The gradient on the residual stream at the output of '{hit[0]}' is "
                   f"{b[layers.index(hit[0])]:.1e} of that at the deepest blocks: it vanishes through "
                   f"{len(layers) - 1} blocks; {len(hit)} block(s) get little gradient.")
    else:
        message = (f"The gradient reaching '{hit[0]}' is {b[layers.index(hit[0])]:.1e} of that at the deepest "
                   f"layers and it learns {g[layers.index(hit[0])]:.1e} as fast: it vanishes through "
                   f"{len(layers) - 1} layers of {acts} activations; {len(hit)} layer(s) hardly learn.")
    return [finding("vanishing_gradients", severity, hit, message,
                     {"step": step, "signal_ratio": float(b[0]), "grad_weight_ratio": float(g[0]),
                      "worst_ratio": worst, "steepest_drop_into": drop_at, "depth": len(layers),
                      "profile": unit}, ctx)]


def exploding_gradients(trace: Trace, ctx: dict) -> list[Finding]:
    found = []
    profile = _profile(trace)
    if profile is not None:
        step, layers, b, g, unit = profile
        both = np.minimum(b, g)
        hit = [k for k, v in zip(layers, both, strict=True) if v > EXPLODING_WARNING]
        if hit:
            worst = float(both.max())
            severity = severity_of(worst, EXPLODING_WARNING, EXPLODING_ERROR, below=False)
            assert severity is not None
            where = "on the residual stream from the deepest blocks" if unit == "blocks" else "from the deepest layers"
            message = f"The gradient grows {worst:.1e}x {where} back to '{hit[0]}': it explodes through depth."
            found.append(finding("exploding_gradients", severity, hit, message,
                                  {"step": step, "signal_ratio": float(b[0]), "grad_weight_ratio": float(g[0]),
                                   "worst_ratio": worst}, ctx))
    measured = latest(trace, "grad_to_weight")
    if measured is not None and not found:
        step, gw = measured
        hot = [k for k in depth_order(trace, step, list(gw)) if gw[k] > GRAD_TO_WEIGHT_EXPLODING]
        if hot:
            top = max(gw[k] for k in hot)
            severity = severity_of(top, GRAD_TO_WEIGHT_EXPLODING, GRAD_TO_WEIGHT_EXPLODING_ERROR, below=False)
            assert severity is not None
            found.append(finding("exploding_gradients", severity, hot,
                                  f"Gradients are up to {top:.1e}x the weights they update (at '{hot[0]}' and "
                                  f"{len(hot) - 1} more): one step at an ordinary learning rate overwrites them.",
                                  {"step": step, "max_grad_to_weight": top}, ctx))
    if "total_grad_norm" in trace.metrics and "" in trace.layers:
        total = trace.metric("total_grad_norm")[:, trace.layers.index("")]
        measured = np.flatnonzero(np.isfinite(total) & (total > 0))
        if measured.size >= 3:
            first, last = total[measured[0]], np.median(total[measured[-3:]])
            growth = float(last / first)
            severity = severity_of(growth, RUN_GROWTH_WARNING, RUN_GROWTH_ERROR, below=False)
            if severity is not None:
                found.append(finding("exploding_gradients", severity, [],
                                      f"The total gradient norm grew {growth:.1e}x during training (from "
                                      f"{first:.1e} at step {int(trace.steps[measured[0]])}).",
                                      {"growth": growth, "first": float(first), "last": float(last)}, ctx))
    return found


