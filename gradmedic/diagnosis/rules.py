"""One rule per kind of finding: a trace in, findings out. Every threshold is named here, with its reason.

Depth profiles are read at the latest step that measured them, with layers in the order they first ran
in the forward (``forward_index``), so a model defined in one order and called in another is read in
depth order. The profile rules compare each layer with the layer nearest the loss, so they do not depend
on the loss's scale, the batch size or the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gradmedic.architecture import ACTIVATION_KINDS, model_kind
from gradmedic.diagnosis._common import depth_order, finding, latest, severity_of
from gradmedic.diagnosis.depth import exploding_gradients, vanishing_gradients, zero_gradient
from gradmedic.diagnosis.findings import Finding
from gradmedic.trace import Trace

__all__ = ["RULES", "context_of", "run_rules"]

# --- units -------------------------------------------------------------------------------------------
# Share of a layer's outputs whose derivative is below 5% of its peak (probes.activations). 30% means a
# third of the layer passes on almost nothing; 80% means the layer is close to a wall.
SATURATED_INFO = 0.1
SATURATED_WARNING = 0.3
SATURATED_ERROR = 0.8
# Share of ReLU units dead for every input (probes.activations.DEAD_MARGIN: off for the whole batch and
# beyond one spread of the layer's pre-activations). Calibrated on trainability (issue 9): deep plain ReLU
# nets at He init, which train, show <= 5% (although 25-40% are off for a batch); ReLU nets in the ordered
# phase (sigma_w^2 1-1.5, depth 10-20) 17-19% and train; a layer whose bias was shifted to -4 100%.
DEAD_INFO = 0.05
DEAD_WARNING = 0.25
DEAD_ERROR = 0.5
# A share needs units to be a share: a unit beyond one spread below zero happens by chance to
# Phi(-DEAD_MARGIN) = 15.9% of units whose inputs barely vary (a squeeze-excitation bottleneck after global
# pooling sees nearly the same input for every sample), so in a 4-unit layer one such unit (25%) is chance.
# A layer's dead share counts only when that many dead units would come by chance with probability below
# 1% (binomial tail): 4 of 4, 8 of 16, 18 of 64; for wide layers the thresholds above decide.
DEAD_CHANCE = 0.159
DEAD_SIGNIFICANCE = 0.01
# Units that die *during* training are the pathology of a too-hot run (an SGD run at lr 3 kills 16-22%
# within 15 steps): a share at least this much above the first measurement is a warning whatever its size.
DIED_IN_TRAINING_WARNING = 0.1

# --- time ------------------------------------------------------------------------------------------
# dL/dx at the first step over dL/dx at the last (probes.timesteps). 1e-3: the first steps get 1000x
# less gradient than the last, the regime where a tanh RNN fails the adding problem (Hochreiter 1991;
# Bengio et al. 1994). Error at 1e-6.
TIME_VANISHING_WARNING = 1e-3
TIME_VANISHING_ERROR = 1e-6
TIME_EXPLODING_WARNING = 1e3
TIME_EXPLODING_ERROR = 1e6

# --- precision -------------------------------------------------------------------------------------
# Share of a float16/bfloat16 layer's gradient entries that are exactly zero. Half of them gone is
# underflow (Micikevicius et al. 2018 show most activation gradients of an fp16 SSD below 2^-24);
# 99% means the layer gets no gradient at all.
UNDERFLOW_WARNING = 0.5
UNDERFLOW_ERROR = 0.99

# --- training ----------------------------------------------------------------------------------------
# Update/weight per step. ~1e-3 is the usual healthy value (Karpathy's rule of thumb; Adam at 1e-3 on
# unit-scale weights); two orders below it a layer barely moves, four orders below it stands still.
STALLED_WARNING = 1e-5
STALLED_ERROR = 1e-7

_RELU_NAMES = {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU"}
_NORMS = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
          "InstanceNorm2d", "RMSNorm", "SyncBatchNorm"}


def context_of(trace: Trace) -> dict:
    """What the model is made of, from the trace's module types and roles (so a loaded trace has it too)."""
    types = trace.meta.get("types", {})
    roles = trace.meta.get("roles", {})
    kinds = set(types.values())
    params = trace.meta.get("params", {})
    act_kind = {k: ACTIVATION_KINDS[k] for k in kinds if k in ACTIVATION_KINDS}
    norms = {name for name, role in roles.items() if role == "norm"} or {n for n, t in types.items() if t in _NORMS}
    low_out = "low_precision_out" in trace.metrics and bool(np.any(trace.metric("low_precision_out") == 1))
    saturating_calls, relu_calls = _functional_activations(trace)
    return {
        "saturating": "saturating" in act_kind.values() or saturating_calls,
        "relu": bool(kinds & _RELU_NAMES) or "relu" in act_kind.values() or relu_calls,
        "normalized": bool(norms),
        "batchnorm": any("BatchNorm" in k for k in kinds),
        "rnn": "RNN" in kinds or "RNNCell" in kinds,
        "lstm": "LSTM" in kinds or "LSTMCell" in kinds,
        "gru": "GRU" in kinds or "GRUCell" in kinds,
        "depth": sum(1 for name in params if name not in norms),
        # float16/bfloat16 weights, or float32 weights under autocast (16-bit outputs, a 16-bit backward)
        "low_precision": trace.meta.get("dtype") in ("float16", "bfloat16") or low_out,
        "autocast": low_out and trace.meta.get("dtype") not in ("float16", "bfloat16"),
        "activations": sorted(act_kind),
        "model_kind": model_kind(types, roles),
        "norm_placement": norm_placement(trace),
        "blocks": sum(1 for role in roles.values() if role == "block"),
    }


# the layers that transform a block's input (its attention's projections, its MLP, a conv): a norm that runs
# before the first of them normalises the block's input (pre-LN); one after, its output (post-LN). Helpers that
# run first without touching the stream (BEiT's relative position bias table, a stage's patch embedding) do not
# vote
_COMPUTE_ROLES = frozenset({"attention", "attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_in", "linear", "conv",
                            "recurrent"})


def _functional_activations(trace: Trace) -> tuple[bool, bool]:
    """Whether the model calls saturating (sigmoid/tanh-like) and ReLU-family activations as functions
    (``torch.sigmoid(self.fc(x))``), read from what the activation probe measured at rows that are no activation
    modules: a saturated share is measured for the saturating families only, a dead share for the ReLU family only
    (which ReLU6 also saturates in, so a row with both counts as ReLU)."""
    roles = trace.meta.get("roles", {})
    rows = [j for j, name in enumerate(trace.layers) if roles.get(name) != "activation"]

    def seen(metric: str) -> np.ndarray:
        if metric not in trace.metrics or not rows:
            return np.zeros(len(rows), dtype=bool)
        return np.any(np.isfinite(trace.metric(metric)[:, rows]), axis=0)

    saturated, dead = seen("saturated_frac"), seen("dead_frac")
    return bool(np.any(saturated & ~dead)), bool(np.any(dead))


def norm_placement(trace: Trace) -> str | None:
    """"pre" when most residual blocks run a norm before their first projection (pre-LN), "post" when they run
    it after their attention/MLP (post-LN), read from the order in which the block's layers ran; None without
    blocks."""
    roles = trace.meta.get("roles", {})
    blocks = [n for n, r in roles.items() if r == "block"]
    if not blocks or "forward_index" not in trace.metrics:
        return None
    order = {k: v for k, v in trace.last("forward_index").items()}
    votes = []
    for block in blocks:
        inside = sorted((order[n], n) for n in order
                        if n.startswith(block + ".") and roles.get(n) in _COMPUTE_ROLES | {"norm"})
        if inside:
            votes.append(roles.get(inside[0][1]) == "norm")
    if not votes:
        return None
    return "pre" if sum(votes) * 2 > len(votes) else "post"


# --- the rules ---------------------------------------------------------------------------------------
def _per_layer_share(trace: Trace, metric: str, kind: str, info: float, warning: float, error: float,
                     describe: Callable[[str, float], str], ctx: dict,
                     keep: Callable[[str, float], bool] | None = None) -> list[Finding]:
    measured = latest(trace, metric)
    if measured is None:
        return []
    step, values = measured
    if keep is not None:
        values = {k: v for k, v in values.items() if keep(k, v)}
    layers = depth_order(trace, step, [k for k, v in values.items() if v >= info])
    if not layers:
        return []
    worst = max(values[k] for k in layers)
    severity = severity_of(worst, warning, error, below=False, info=info)
    assert severity is not None
    flagged = [k for k in layers if values[k] >= (warning if severity != "info" else info)]
    evidence = {"step": step, **{f"{metric}[{k}]": values[k] for k in flagged}}
    first = _first_measured(trace, metric)
    if first is not None and first[0] < step:
        evidence["at_first_step"] = {k: first[1].get(k) for k in flagged}
    return [finding(kind, severity, flagged, describe(flagged[0], values[flagged[0]]) +
                     (f" ({len(flagged) - 1} more layer(s))" if len(flagged) > 1 else ""), evidence, ctx)]


def _first_measured(trace: Trace, metric: str) -> tuple[int, dict[str, float]] | None:
    """The first step at which any layer has ``metric``, and each layer's own first value: a layer that did not
    run at that step (an expert no token was routed to, a branch taken later) is compared with itself, not
    with nothing."""
    column = trace.metric(metric)
    rows = np.flatnonzero(~np.all(np.isnan(column), axis=1))
    if rows.size == 0:
        return None
    first = {}
    for j, k in enumerate(trace.layers):
        measured = np.flatnonzero(~np.isnan(column[:, j]))
        if measured.size:
            first[k] = float(column[measured[0], j])
    return int(trace.steps[rows[0]]), first


def saturated_units(trace: Trace, ctx: dict) -> list[Finding]:
    return _per_layer_share(trace, "saturated_frac", "saturated_units", SATURATED_INFO, SATURATED_WARNING,
                            SATURATED_ERROR, lambda k, v: f"{100 * v:.0f}% of the activations at '{k}' are saturated "
                            "(derivative below 5% of its peak), so little gradient passes through it", ctx)


def dead_units(trace: Trace, ctx: dict) -> list[Finding]:
    found = _dead_units(trace, ctx, keep=_more_dead_than_chance(trace))
    if found and found[0].severity != "info":
        return found
    # units that died during training are judged against the same layer at the first step, so the chance
    # of a unit sitting beyond one spread at init (DEAD_CHANCE) does not enter
    loose = _dead_units(trace, ctx)
    if loose:
        first = loose[0].evidence.get("at_first_step", {})
        died = {k: loose[0].evidence[f"dead_frac[{k}]"] - (first.get(k) or 0.0) for k in first}
        if any(v >= DIED_IN_TRAINING_WARNING for v in died.values()):
            f = loose[0]
            return [finding("dead_units", "warning", f.layers, f.message + ", and they died during training",
                            {**f.evidence, "died_in_training": died}, ctx)]
    return found


def _dead_units(trace: Trace, ctx: dict, keep: Callable[[str, float], bool] | None = None) -> list[Finding]:
    return _per_layer_share(trace, "dead_frac", "dead_units", DEAD_INFO, DEAD_WARNING, DEAD_ERROR,
                            lambda k, v: f"{100 * v:.0f}% of the units at '{k}' are dead (zero for every sample), "
                            "so their incoming weights get no gradient", ctx, keep=keep)


def _binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): exact (in log space) up to 1000 trials, beyond that the Chernoff
    bound exp(-n KL(k/n || p)), an upper bound, so a wide layer is flagged only when surely beyond chance."""
    if k <= n * p:
        return 1.0
    if n > 1000:
        q = k / n
        kl = q * math.log(q / p) + ((1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else 0.0)
        return math.exp(-n * kl)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs)


def _more_dead_than_chance(trace: Trace) -> Callable[[str, float], bool]:
    """Whether a layer's dead share is more than chance (DEAD_CHANCE, DEAD_SIGNIFICANCE) given its units."""
    seen = latest(trace, "dead_units_seen") if "dead_units_seen" in trace.metrics else None
    units = seen[1] if seen is not None else {}

    def keep(layer: str, share: float) -> bool:
        n = units.get(layer)
        if n is None or not math.isfinite(n) or n < 1:
            return True  # a trace without unit counts: judged by the share alone
        n, k = int(round(n)), int(round(share * n))
        return _binomial_tail(n, k, DEAD_CHANCE) < DEAD_SIGNIFICANCE

    return keep


def nonfinite(trace: Trace, ctx: dict) -> list[Finding]:
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


def _time_rule(trace: Trace, ctx: dict, exploding: bool) -> list[Finding]:
    measured = latest(trace, "time_grad_ratio")
    horizon = latest(trace, "horizon_ratio")
    if measured is None and horizon is None:
        return []
    step, ratios = measured if measured is not None else horizon
    reach = horizon[1] if horizon is not None else {}
    series = trace.series("time_grad_rms")
    horizon_series = trace.series("horizon_rms")
    found = []
    for layer in depth_order(trace, step, sorted(set(ratios) | set(reach))):
        # the loss's own gradient through time, and the horizon: how much of the last output's gradient
        # reaches the first step. With a loss at every step the first stays flat while the second vanishes
        # (a language model cannot learn what lies beyond its horizon), so vanishing reads the smaller.
        total, last_only = ratios.get(layer, math.nan), reach.get(layer, math.nan)
        r = np.nanmax([total, last_only]) if exploding else np.nanmin([total, last_only])
        by_horizon = not exploding and last_only == r and not (total <= r)
        if exploding:
            severity = severity_of(r, TIME_EXPLODING_WARNING, TIME_EXPLODING_ERROR, below=False)
        else:
            severity = severity_of(r, TIME_VANISHING_WARNING, TIME_VANISHING_ERROR)
        if severity is None:
            continue
        length = int(np.sum(~np.isnan(series[layer][1][-1]))) if layer in series else None
        kind = "exploding_through_time" if exploding else "vanishing_through_time"
        verb = "grows" if exploding else "decays"
        evidence = {"step": step, "first_over_last": float(r), "length": length}
        message = (f"The gradient reaching the first of {length} time steps of '{layer}' is {r:.1e} of that at the "
                   f"last: it {verb} through time.")
        if by_horizon:
            rms = horizon_series[layer][1][-1] if layer in horizon_series else np.array([])
            rms = rms[~np.isnan(rms)]
            length = int(rms.size)
            reached = int(np.sum(rms >= TIME_VANISHING_WARNING * rms[-1])) if rms.size else 0
            evidence.update(length=length, horizon=reached, loss_over_time=float(total))
            if total >= TIME_VANISHING_WARNING:  # the loss's own ratio looks healthy: a loss at every step
                why = f" (the loss at every step hides it: its own ratio is {total:.1e})"
            elif math.isfinite(total):  # a loss on the last step only falls as the horizon does
                why = f" (the loss's own gradient through time falls too, to {total:.1e})"
            else:
                why = ""
            message = (f"The last output of '{layer}' gets {r:.1e} of its gradient from the first of {length} steps: "
                       f"its gradient horizon is {reached} step(s), so dependencies longer than that cannot be "
                       f"learned{why}.")
        found.append(finding(kind, severity, [layer], message, evidence, ctx))
    return found


def vanishing_through_time(trace: Trace, ctx: dict) -> list[Finding]:
    return _time_rule(trace, ctx, exploding=False)


def exploding_through_time(trace: Trace, ctx: dict) -> list[Finding]:
    return _time_rule(trace, ctx, exploding=True)


def gradient_underflow(trace: Trace, ctx: dict) -> list[Finding]:
    """Exact zeros in the gradients of a model whose backward runs in 16 bits (half weights, or autocast).
    Zeros that are structure (an embedding's unused rows) are not counted (probes.gradients)."""
    if not ctx.get("low_precision"):
        return []
    zero = [f for f in zero_gradient(trace, ctx) if f.kind == "gradient_underflow"]
    if zero:
        return zero
    dtype = "autocast" if ctx.get("autocast") else trace.meta.get("dtype")
    return _per_layer_share(trace, "grad_zero_frac", "gradient_underflow", UNDERFLOW_WARNING, UNDERFLOW_WARNING,
                            UNDERFLOW_ERROR, lambda k, v: f"{100 * v:.0f}% of the {dtype} "
                            f"gradient entries of '{k}' are exactly zero: they flushed to zero", ctx)


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


# A gradient of exactly zero at one step can be by design at init (a zero-initialised layer after it: LoRA's B,
# a zero-init residual's last BatchNorm gamma, ReZero, adaLN-Zero), and the first update ends it. Exactly zero at
# every one of at least this many measured steps, with updates in between, is structure: the loss does not
# depend on the layer at these inputs (attention over one position gives its query and key none).
ZERO_GRADIENT_STEPS = 2


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


def no_gradient(trace: Trace, ctx: dict) -> list[Finding]:
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
    zero = [] if ctx.get("low_precision") else _zero_gradient(trace)
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


def stalled_updates(trace: Trace, ctx: dict) -> list[Finding]:
    if "update_to_weight" not in trace.metrics:
        return []
    column = trace.metric("update_to_weight")
    grads = trace.metric("grad_norm") if "grad_norm" in trace.metrics else None
    # steps at which the gradient probe ran (some layer has a gradient norm)
    ran = None if grads is None else ~np.all(np.isnan(grads), axis=1)
    # a layer that never had a gradient is not moved by any optimizer: no_gradient says so, not this rule; nor is
    # a layer the user froze
    never = set(_without_gradient(trace)[0]) | set(_zero_gradient(trace)) | _frozen(trace)
    medians = {}
    for j, layer in enumerate(trace.layers):
        if layer in never:
            continue
        values = column[:, j][~np.isnan(column[:, j])]
        if ran is not None and np.isnan(grads[ran, j]).any() and (values > 0).any():  # type: ignore[index]
            # the layer had no gradient at some steps (an expert no token was routed to, a branch taken only
            # sometimes): an optimizer leaves a parameter without a gradient exactly as it is, so those zero
            # updates say nothing about its learning rate; the steps that moved it do
            values = values[values > 0]
        if values.size:
            medians[layer] = float(np.median(values))
    if not medians:
        return []
    step = int(trace.steps[-1])
    stalled = depth_order(trace, step, [k for k, v in medians.items() if v < STALLED_WARNING])
    if not stalled:
        return []
    worst = min(medians[k] for k in stalled)
    severity = severity_of(worst, STALLED_WARNING, STALLED_ERROR)
    assert severity is not None
    return [finding("stalled_updates", severity, stalled,
                     f"Each step changes '{stalled[0]}' by {medians[stalled[0]]:.1e} of its size (healthy is about "
                     "1e-3): it is not learning.", {f"update_to_weight[{k}]": medians[k] for k in stalled}, ctx)]


RULES: dict[str, Callable[[Trace, dict], list[Finding]]] = {
    "vanishing_gradients": vanishing_gradients,
    "exploding_gradients": exploding_gradients,
    "saturated_units": saturated_units,
    "dead_units": dead_units,
    "nonfinite": nonfinite,
    "vanishing_through_time": vanishing_through_time,
    "exploding_through_time": exploding_through_time,
    "gradient_underflow": gradient_underflow,
    "stalled_updates": stalled_updates,
    "no_gradient": no_gradient,
}


def run_rules(trace: Trace) -> tuple[list[Finding], dict]:
    ctx = context_of(trace)
    findings: list[Finding] = []
    for rule in RULES.values():
        findings += rule(trace, ctx)
    if any(f.kind == "nonfinite" for f in findings):
        # NaN poisons every ratio: the profile rules would only repeat it
        findings = [f for f in findings if f.kind in ("nonfinite", "gradient_underflow")]
    return findings, ctx
