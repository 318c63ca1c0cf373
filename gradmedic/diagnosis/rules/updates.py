"""The rules of what moves: layers no gradient reaches (cut off from the loss, unused, exactly zero) and layers the
optimizer barely moves (stalled updates)."""

from __future__ import annotations

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import depth_order, finding, scalar_in_order, severity_of
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.trace import Trace

__all__ = ["no_gradient", "stalled_updates"]

# --- training ----------------------------------------------------------------------------------------
# Update/weight per step. ~1e-3 is the usual healthy value (Karpathy's rule of thumb; Adam at 1e-3 on
# unit-scale weights); two orders below it a layer barely moves, four orders below it stands still.
STALLED_WARNING = 1e-5
STALLED_ERROR = 1e-7
# In a run (not gm.check, whose steps from init are what it asks about) some updates are small by schedule, not by a
# fault, and are not judged: one made at less than half the run's latest learning rate (a warmup's first steps:
# Hugging Face's linear schedule gives lr 0 at step 0, and a healthy GPT-2 Trainer run was told "stalled" as an error at
# step 1 by the Monitor's first look; or the steps before the lr was raised), and one GradScaler skipped (its scale
# halved after it: the weights did not move). The update measured at step s is W_s - W_{s-1}, made with the lr
# recorded at step s - 1. A single judged measurement is not "each step": a run needs STALLED_MIN_POINTS.
STALLED_LR_SHARE = 0.5
STALLED_MIN_POINTS = 2
# That reference is a weight matrix's: its entries are ~1/sqrt(fan_in) (0.02-0.2 at torch's default init). A layer
# whose entries are larger (a norm's gain at 1, an embedding drawn from N(0, 1), a scalar gain) moves less relative
# to its own size for the same step per entry: Adam moves every entry by about lr whatever its scale, so its
# update/weight is rms(matrix)/rms(gain) below the matrices' (5-10x in the issue-26 corpus's GPT, whose QK-norm gains
# read 8e-6 while each of their entries moved as far as a query weight's). Such a layer is judged by its step per
# entry against the model's typical weight entry (the median RMS entry of its layers that are not norms), not against
# its own entries; a layer with smaller entries than that is judged as before (never more strictly).

# A gradient of exactly zero at one step can be by design at init (a zero-initialised layer after it: LoRA's B,
# a zero-init residual's last BatchNorm gamma, ReZero, adaLN-Zero), and the first update ends it. Exactly zero at
# every one of at least this many measured steps, with updates in between, is structure: the loss does not
# depend on the layer at these inputs (attention over one position gives its query and key none).
ZERO_GRADIENT_STEPS = 2


def _frozen(trace: Trace) -> set[str]:
    """Layers whose parameters were all frozen after the Monitor was built (at its last flush): not meant to move."""
    return set(trace.meta.get("frozen", ()))


def _without_gradient(trace: Trace) -> tuple[list[str], int]:
    """Layers with trainable parameters that had no gradient (``p.grad`` None: not a zero gradient) at every
    step the gradient probe ran, and how many steps that was; ``([], 0)`` when it never ran."""
    if "grad_norm" not in trace.metrics:
        return [], 0
    grads = trace.metric("grad_norm")
    ran = ~np.all(np.isnan(grads), axis=1)  # steps at which some layer had a gradient
    if not ran.any():
        return [], 0
    # a layer nothing was measured for at all is in the model's parameters (meta), not in the trace's layers; one
    # frozen after the Monitor was built (meta "frozen", at the last flush) is not meant to get a gradient
    column = {layer: j for j, layer in enumerate(trace.layers)}
    frozen = _frozen(trace)
    never = [layer for layer, size in trace.meta.get("params", {}).items()
             if size and layer not in frozen and (layer not in column or np.isnan(grads[ran, column[layer]]).all())]
    return never, int(ran.sum())


def _zero_gradient(trace: Trace) -> list[str]:
    """Layers whose gradient was exactly zero (not None) at every step it was measured, at ZERO_GRADIENT_STEPS
    steps at least; none when every measured layer's was zero (``depth.zero_gradient``'s case)."""
    if "grad_norm" not in trace.metrics:
        return []
    grads = trace.metric("grad_norm")
    measured = ~np.isnan(grads)
    zero = (measured.sum(axis=0) >= ZERO_GRADIENT_STEPS) & np.all(~measured | (grads == 0), axis=0)
    layers = [layer for j, layer in enumerate(trace.layers) if zero[j] and layer]
    if len(layers) == int(measured.any(axis=0).sum()):
        return []
    frozen = _frozen(trace)
    return [layer for layer in layers if layer not in frozen]


def _ran_in_forward(trace: Trace) -> set[str] | None:
    """Layers that ran in some measured forward (``forward_index``), None when no forward was measured."""
    if "forward_index" not in trace.metrics:
        return None
    order = trace.metric("forward_index")
    measured = ~np.all(np.isnan(order), axis=1)
    if not measured.any():
        return None
    return {layer for j, layer in enumerate(trace.layers) if not np.isnan(order[measured, j]).all()}


def _output_reached(trace: Trace) -> set[str]:
    """Layers whose output got a gradient at some measured step (a finite, positive ``backward_norm``)."""
    if "backward_norm" not in trace.metrics:
        return set()
    signal = trace.metric("backward_norm")
    with np.errstate(invalid="ignore"):
        hit = np.any(np.isfinite(signal) & (signal > 0), axis=0)
    return {layer for j, layer in enumerate(trace.layers) if hit[j]}


def _and_more(layers: list[str]) -> str:
    """" (and 3 more layers)" after the first layer's name, so a message does not read as if one layer alone."""
    more = len(layers) - 1
    return f" (and {more} more layer{'s' * (more != 1)})" if more else ""


def no_gradient(trace: Trace, ctx: Context) -> list[Finding]:
    """Trainable layers no gradient reached at any measured step. One that ran in the forward is cut off from
    the loss (its output detached, computed under ``torch.no_grad``, or not used): a warning, since its
    parameters were meant to train or should be frozen. One that did not run is unused, or a branch or an
    expert not taken in the measured steps: information, since it costs nothing but memory (and DDP's
    ``find_unused_parameters``). Neither is a learning-rate problem, which is how its zero updates would
    otherwise read (stalled_updates). Under ``gm.check``'s stand-in loss, which reads the model's first output
    alone, a layer that feeds only the other outputs (BERT's pooler) gets none by construction: information, where
    the model returned several. One whose output gets a gradient while the parameters it owns itself get none
    does not use them in its forward (a parameter for some modes only): information. A layer frozen after the
    Monitor was built (``meta["frozen"]``) is left out."""
    never, steps = _without_gradient(trace)
    # in 16 bits a zero gradient can be underflow: gradient_underflow reads those
    zero = [] if ctx.low_precision else _zero_gradient(trace)
    if not never and not zero:
        return []
    ran = _ran_in_forward(trace)
    at = int(trace.steps[-1])
    reached = _output_reached(trace)
    # a layer whose output does get a gradient but whose own parameters do not: the forward does not use them
    # (XLNet's mask_emb, used only with target_mapping; an output bias no longer tied to the decoder's)
    unused = depth_order(trace, at, [k for k in never if k in reached])
    cut = depth_order(trace, at, [k for k in never if ran is not None and k in ran and k not in reached])
    idle = depth_order(trace, at, [k for k in never if (ran is None or k not in ran) and k not in reached])
    measured = f"{steps} measured step{'s' * (steps != 1)}"
    stand_in = (trace.meta.get("check") or {}).get("loss_from") == "projection_of_first"
    found = []
    if cut:
        evidence = {"steps": steps, "layers": len(cut), "ran_in_forward": 1}
        if stand_in:
            found.append(finding("no_gradient", "info", cut,
                                 f"'{cut[0]}'{_and_more(cut)} runs in the forward but gets no gradient from "
                                 "gm.check's stand-in loss, which reads only the model's first output: it feeds "
                                 "another output, or none; pass loss_fn (or targets) to check it with your own loss.",
                                 evidence, ctx))
        else:
            found.append(finding("no_gradient", "warning", cut,
                                 f"'{cut[0]}'{_and_more(cut)} runs in the forward but no gradient reaches it "
                                 f"({measured}): its output does not reach the loss (detached, computed under "
                                 "torch.no_grad, or not used); freeze it with requires_grad_(False) if that is meant.",
                                 evidence, ctx))
    if zero:
        zero = depth_order(trace, at, zero)
        steps_zero = int(np.sum(~np.isnan(trace.metric("grad_norm")[:, trace.layers.index(zero[0])])))
        found.append(finding("no_gradient", "warning", zero,
                             f"'{zero[0]}'{_and_more(zero)} gets a gradient of exactly zero at every measured step "
                             f"({steps_zero}): the loss does not depend on what it computes at these inputs "
                             "(attention over a single position gives its query and key none; so does an output "
                             "of which only other positions are read, or units all dead); its parameters cannot "
                             "learn from this data.", {"steps": steps_zero, "layers": len(zero), "exactly_zero": 1},
                             ctx))
    if unused:
        found.append(finding("no_gradient", "info", unused,
                             f"'{unused[0]}'{_and_more(unused)} gets a gradient at its output, but none reaches the "
                             f"parameters it owns itself ({measured}): its forward does not use them (a parameter "
                             "used only in some modes or with some inputs); freeze or remove them if they are not "
                             "meant to train.",
                             {"steps": steps, "layers": len(unused), "output_reached": 1}, ctx))
    if idle:
        what = "does not run in the forward and " if ran is not None else ""
        found.append(finding("no_gradient", "info", idle,
                             f"'{idle[0]}'{_and_more(idle)} {what}gets no gradient ({measured}): an unused module, "
                             "or a branch or expert not taken; freeze or remove it if it is not meant to train (DDP "
                             "needs find_unused_parameters=True for it).",
                             {"steps": steps, "layers": len(idle),
                              **({"ran_in_forward": 0} if ran is not None else {})}, ctx))
    return found


def _at(read: tuple[np.ndarray, np.ndarray], steps: np.ndarray) -> np.ndarray:
    """A run scalar (steps, values in step order) at each of ``steps``, NaN where it was not recorded."""
    at, values = read
    if not at.size:
        return np.full(len(steps), np.nan)
    i = np.minimum(np.searchsorted(at, steps), at.size - 1)
    return np.where(at[i] == steps, values[i], np.nan)


def _judged_steps(trace: Trace) -> np.ndarray:
    """The trace's rows whose update ratio is judged: all of gm.check's; of a run's, those whose update was made at
    STALLED_LR_SHARE of the latest lr or more and was not skipped by GradScaler (see STALLED_LR_SHARE)."""
    rows = np.ones(len(trace.steps), dtype=bool)
    if "check" in trace.meta:
        return rows
    lr = scalar_in_order(trace, "lr")
    if lr is not None and lr[1].size and lr[1][-1] > 0:
        rows &= ~(_at(lr, trace.steps - 1) < STALLED_LR_SHARE * lr[1][-1])
    scale = scalar_in_order(trace, "loss_scale")
    if scale is not None:  # halved after step s - 1: GradScaler skipped it
        rows &= ~(_at(scale, trace.steps) < _at(scale, trace.steps - 1))
    return rows


def stalled_updates(trace: Trace, ctx: Context) -> list[Finding]:
    if "update_to_weight" not in trace.metrics:
        return []
    rows = _judged_steps(trace)
    column = trace.metric("update_to_weight")[rows]
    grads = trace.metric("grad_norm")[rows] if "grad_norm" in trace.metrics else None
    # steps at which the gradient probe ran (some layer has a gradient norm)
    ran = None if grads is None else ~np.all(np.isnan(grads), axis=1)
    # a layer that never had a gradient is not moved by any optimizer: no_gradient says so, not this rule; nor is
    # a layer the user froze
    never = set(_without_gradient(trace)[0]) | set(_zero_gradient(trace)) | _frozen(trace)
    # nor one the optimizer does not hold (gm.check's optimizer: a GAN's generator step leaves D as it is, by design)
    optimized = trace.meta.get("optimized")
    if optimized is not None:
        never |= set(trace.layers) - set(optimized)
    medians = {}
    for j, layer in enumerate(trace.layers):
        if layer in never:
            continue
        values = column[:, j][~np.isnan(column[:, j])]
        if "check" not in trace.meta and values.size < STALLED_MIN_POINTS:
            continue  # one measurement of a run is not "each step"
        if ran is not None and np.isnan(grads[ran, j]).any() and (values > 0).any():  # type: ignore[index]
            # the layer had no gradient at some steps (an expert no token was routed to, a branch taken only
            # sometimes): an optimizer leaves a parameter without a gradient exactly as it is, so those zero
            # updates say nothing about its learning rate; the steps that moved it do
            values = values[values > 0]
        if values.size:
            medians[layer] = float(np.median(values))
    if not medians:
        return []
    judged = _per_typical_entry(trace, medians)
    step = int(trace.steps[-1])
    stalled = depth_order(trace, step, [k for k, v in judged.items() if v < STALLED_WARNING])
    if not stalled:
        return []
    worst = min(judged[k] for k in stalled)
    severity = severity_of(worst, STALLED_WARNING, STALLED_ERROR)
    assert severity is not None
    first = stalled[0]
    per_entry = "" if judged[first] == medians[first] else \
        f" ({judged[first]:.1e} of the model's typical weight entry, per entry)"
    evidence = {f"update_to_weight[{k}]": medians[k] for k in stalled}
    evidence.update({f"per_typical_entry[{k}]": judged[k] for k in stalled if judged[k] != medians[k]})
    return [finding("stalled_updates", severity, stalled,
                     f"Each step changes '{first}' by {medians[first]:.1e} of its size{per_entry} (healthy is about "
                     f"1e-3){_more(stalled)}: it is not learning.", evidence, ctx)]


def _more(layers: list[str]) -> str:
    return f" ({len(layers) - 1} more layer{'s' * (len(layers) != 2)})" if len(layers) > 1 else ""


def _entry_rms(trace: Trace, layers: list[str]) -> dict[str, float]:
    """The RMS weight entry of each layer at its last measurement: its weight norm over sqrt(its parameter count)."""
    sizes = trace.meta.get("params", {})
    if "weight_norm" not in trace.metrics:
        return {}
    norms = trace.metric("weight_norm")
    out = {}
    for layer in layers:
        if not sizes.get(layer) or layer not in trace.layers:
            continue
        values = norms[:, trace.layers.index(layer)]
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            out[layer] = float(values[-1]) / float(np.sqrt(sizes[layer]))
    return out


def _per_typical_entry(trace: Trace, ratios: dict[str, float]) -> dict[str, float]:
    """Each layer's update/weight, restated for a layer whose weight entries are larger than the model's typical
    entry (see STALLED_WARNING's note): update/weight x rms(layer) / rms(typical), its step per entry measured
    against the typical entry. The typical entry: the median RMS entry of the layers that are not norms (all of them
    where every layer is one). Unchanged where the weight norms or parameter counts are not in the trace."""
    rms = _entry_rms(trace, list(ratios))
    roles = trace.meta.get("roles", {})
    reference = [v for k, v in rms.items() if roles.get(k) != "norm"] or list(rms.values())
    if not reference:
        return ratios
    typical = float(np.median(reference))
    return {k: v * max(1.0, rms[k] / typical) if k in rms else v for k, v in ratios.items()}


# --- remedies, ranked --------------------------------------------------------------------------------
def rank_stalled(ctx: Context) -> list[str]:
    return ["adaptive_optimizer", "raise_learning_rate", "lr_warm_restarts", "add_normalization"]


def rank_no_gradient(ctx: Context) -> list[str]:
    return []  # a graph cut or an unused module: the message says what to look for; no remedy applies


register(Rule("stalled_updates", stalled_updates, rank_stalled, {None: ("lr_warmup",)}))
register(Rule("no_gradient", no_gradient, rank_no_gradient))
