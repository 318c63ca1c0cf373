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

from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.prescriptions import prescribe
from gradmedic.trace import Trace

__all__ = ["RULES", "context_of", "run_rules"]

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

# --- units -------------------------------------------------------------------------------------------
# Share of a layer's outputs whose derivative is below 5% of its peak (probes.activations). 30% means a
# third of the layer passes on almost nothing; 80% means the layer is close to a wall.
SATURATED_INFO = 0.1
SATURATED_WARNING = 0.3
SATURATED_ERROR = 0.8
# Share of ReLU units that are zero for every sample. Healthy nets at init have a few percent at most;
# a quarter dead is capacity lost; three quarters dead starves everything below of gradient.
DEAD_INFO = 0.1
DEAD_WARNING = 0.25
DEAD_ERROR = 0.75

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

_SATURATING = {"Sigmoid", "Tanh", "Hardtanh", "Softsign", "Hardsigmoid", "LogSigmoid"}
_RELU = {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU"}
_NORMS = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
          "InstanceNorm2d", "RMSNorm", "SyncBatchNorm"}
_PASS = {"Sequential", "ModuleList", "ModuleDict", "Dropout", "Identity", "Flatten"}


def context_of(trace: Trace) -> dict:
    """What the model is made of, from the trace's module types (so a loaded trace has it too)."""
    types = trace.meta.get("types", {})
    kinds = set(types.values())
    params = trace.meta.get("params", {})
    return {
        "saturating": bool(kinds & _SATURATING),
        "relu": bool(kinds & _RELU),
        "normalized": bool(kinds & _NORMS),
        "rnn": "RNN" in kinds or "RNNCell" in kinds,
        "lstm": "LSTM" in kinds or "LSTMCell" in kinds,
        "gru": "GRU" in kinds or "GRUCell" in kinds,
        "depth": sum(1 for name in params if types.get(name) not in _NORMS),
        "low_precision": trace.meta.get("dtype") in ("float16", "bfloat16"),
        "activations": sorted(kinds & (_SATURATING | _RELU | {"GELU", "SiLU", "ELU", "Mish"})),
    }


def _latest(trace: Trace, metric: str) -> tuple[int, dict[str, float]] | None:
    """The latest step at which ``metric`` was measured, and its value per layer there."""
    if metric not in trace.metrics:
        return None
    column = trace.metric(metric)
    rows = np.flatnonzero(~np.all(np.isnan(column), axis=1))
    if rows.size == 0:
        return None
    s = rows[-1]
    return int(trace.steps[s]), {layer: float(column[s, j]) for j, layer in enumerate(trace.layers)
                                 if not math.isnan(column[s, j])}


def _depth_order(trace: Trace, step: int, layers: list[str]) -> list[str]:
    module_order = {name: i for i, name in enumerate(trace.meta.get("modules", []))}
    index: dict[str, float] = {}
    if "forward_index" in trace.metrics:
        s = int(np.searchsorted(trace.steps, step))
        column = trace.metric("forward_index")[s]
        index = {layer: float(column[j]) for j, layer in enumerate(trace.layers) if not math.isnan(column[j])}
    return sorted(layers, key=lambda name: (index.get(name, math.inf), module_order.get(name, 0)))


def _severity(value: float, warning: float, error: float, below: bool = True, info: float | None = None) -> str | None:
    if below:
        value, warning, error = -value, -warning, -error
        info = None if info is None else -info
    if value >= error:
        return "error"
    if value >= warning:
        return "warning"
    if info is not None and value >= info:
        return "info"
    return None


def _finding(kind: str, severity: str, layers: list[str], message: str, evidence: dict, ctx: dict) -> Finding:
    return Finding(kind=kind, severity=severity, layers=layers, message=message, evidence=evidence,
                   remedies=prescribe(kind, ctx))


# --- the rules ---------------------------------------------------------------------------------------
def _profile(trace: Trace) -> tuple[int, list[str], np.ndarray, np.ndarray] | None:
    """(step, layers in depth order, signal and grad/weight relative to the deepest layers).

    The backward signal here is the norm of dL/d(output) over the whole tensor: its RMS per element
    falls with the number of elements, so early conv maps with many positions would look vanished.
    """
    signal = _latest(trace, "backward_norm")
    ratio = _latest(trace, "grad_to_weight")
    if signal is None or ratio is None:
        return None
    step, bs = signal
    gw = {k: v for k, v in ratio[1].items() if v > 0 and math.isfinite(v)}
    layers = _depth_order(trace, step, [k for k in bs if k in gw and bs[k] > 0])
    if len(layers) < 2:
        return None
    b = np.array([bs[k] for k in layers])
    g = np.array([gw[k] for k in layers])
    deep = max(1, math.ceil(REFERENCE_FRACTION * len(layers)))
    return step, layers, b / np.median(b[-deep:]), g / np.median(g[-deep:])


def vanishing_gradients(trace: Trace, ctx: dict) -> list[Finding]:
    profile = _profile(trace)
    if profile is None:
        return []
    step, layers, b, g = profile
    both = np.maximum(b, g)  # a layer vanishes when both measures have fallen
    hit = [k for k, v in zip(layers, both, strict=True) if v < VANISHING_WARNING]
    if not hit:
        return []
    worst = float(both.min())
    severity = _severity(worst, VANISHING_WARNING, VANISHING_ERROR)
    assert severity is not None
    gains = np.diff(np.log10(np.maximum(both, 1e-300)))
    drop_at = layers[int(np.argmin(gains)) + 1] if len(gains) else layers[0]
    acts = ", ".join(ctx.get("activations", [])) or "its"
    message = (f"The gradient reaching '{hit[0]}' is {b[layers.index(hit[0])]:.1e} of that at the deepest layers "
               f"and it learns {g[layers.index(hit[0])]:.1e} as fast: it vanishes through "
               f"{len(layers) - 1} layers of {acts} activations; {len(hit)} layer(s) hardly learn.")
    return [_finding("vanishing_gradients", severity, hit, message,
                     {"step": step, "signal_ratio": float(b[0]), "grad_weight_ratio": float(g[0]),
                      "worst_ratio": worst, "steepest_drop_into": drop_at, "depth": len(layers)}, ctx)]


def exploding_gradients(trace: Trace, ctx: dict) -> list[Finding]:
    found = []
    profile = _profile(trace)
    if profile is not None:
        step, layers, b, g = profile
        both = np.minimum(b, g)
        hit = [k for k, v in zip(layers, both, strict=True) if v > EXPLODING_WARNING]
        if hit:
            worst = float(both.max())
            severity = _severity(worst, EXPLODING_WARNING, EXPLODING_ERROR, below=False)
            assert severity is not None
            message = (f"The gradient grows {worst:.1e}x from the deepest layers back to '{hit[0]}': it explodes "
                       "through depth.")
            found.append(_finding("exploding_gradients", severity, hit, message,
                                  {"step": step, "signal_ratio": float(b[0]), "grad_weight_ratio": float(g[0]),
                                   "worst_ratio": worst}, ctx))
    latest = _latest(trace, "grad_to_weight")
    if latest is not None and not found:
        step, gw = latest
        hot = [k for k in _depth_order(trace, step, list(gw)) if gw[k] > GRAD_TO_WEIGHT_EXPLODING]
        if hot:
            top = max(gw[k] for k in hot)
            severity = _severity(top, GRAD_TO_WEIGHT_EXPLODING, GRAD_TO_WEIGHT_EXPLODING_ERROR, below=False)
            assert severity is not None
            found.append(_finding("exploding_gradients", severity, hot,
                                  f"Gradients are up to {top:.1e}x the weights they update (at '{hot[0]}' and "
                                  f"{len(hot) - 1} more): one step at an ordinary learning rate overwrites them.",
                                  {"step": step, "max_grad_to_weight": top}, ctx))
    if "total_grad_norm" in trace.metrics and "" in trace.layers:
        total = trace.metric("total_grad_norm")[:, trace.layers.index("")]
        measured = np.flatnonzero(np.isfinite(total) & (total > 0))
        if measured.size >= 3:
            first, last = total[measured[0]], np.median(total[measured[-3:]])
            growth = float(last / first)
            severity = _severity(growth, RUN_GROWTH_WARNING, RUN_GROWTH_ERROR, below=False)
            if severity is not None:
                found.append(_finding("exploding_gradients", severity, [],
                                      f"The total gradient norm grew {growth:.1e}x during training (from "
                                      f"{first:.1e} at step {int(trace.steps[measured[0]])}).",
                                      {"growth": growth, "first": float(first), "last": float(last)}, ctx))
    return found


def _per_layer_share(trace: Trace, metric: str, kind: str, info: float, warning: float, error: float,
                     describe: Callable[[str, float], str], ctx: dict) -> list[Finding]:
    latest = _latest(trace, metric)
    if latest is None:
        return []
    step, values = latest
    layers = _depth_order(trace, step, [k for k, v in values.items() if v >= info])
    if not layers:
        return []
    worst = max(values[k] for k in layers)
    severity = _severity(worst, warning, error, below=False, info=info)
    assert severity is not None
    flagged = [k for k in layers if values[k] >= (warning if severity != "info" else info)]
    evidence = {"step": step, **{f"{metric}[{k}]": values[k] for k in flagged}}
    first = _first_measured(trace, metric)
    if first is not None and first[0] < step:
        evidence["at_first_step"] = {k: first[1].get(k) for k in flagged}
    return [_finding(kind, severity, flagged, describe(flagged[0], values[flagged[0]]) +
                     (f" ({len(flagged) - 1} more layer(s))" if len(flagged) > 1 else ""), evidence, ctx)]


def _first_measured(trace: Trace, metric: str) -> tuple[int, dict[str, float]] | None:
    column = trace.metric(metric)
    rows = np.flatnonzero(~np.all(np.isnan(column), axis=1))
    if rows.size == 0:
        return None
    s = rows[0]
    return int(trace.steps[s]), {k: float(column[s, j]) for j, k in enumerate(trace.layers)
                                 if not math.isnan(column[s, j])}


def saturated_units(trace: Trace, ctx: dict) -> list[Finding]:
    return _per_layer_share(trace, "saturated_frac", "saturated_units", SATURATED_INFO, SATURATED_WARNING,
                            SATURATED_ERROR, lambda k, v: f"{100 * v:.0f}% of the outputs of '{k}' are saturated "
                            "(derivative below 5% of its peak), so little gradient passes through it", ctx)


def dead_units(trace: Trace, ctx: dict) -> list[Finding]:
    return _per_layer_share(trace, "dead_frac", "dead_units", DEAD_INFO, DEAD_WARNING, DEAD_ERROR,
                            lambda k, v: f"{100 * v:.0f}% of the units of '{k}' are dead (zero for every sample), "
                            "so their incoming weights get no gradient", ctx)


def nonfinite(trace: Trace, ctx: dict) -> list[Finding]:
    events = [e for e in trace.events if e.get("kind") == "nonfinite"]
    if events:
        first_step = min(e["step"] for e in events)
        at = [e for e in events if e["step"] == first_step]
        first = next((e for e in at if e["phase"] == "forward"), at[0])
        where = "output" if first["phase"] == "forward" else "output's gradient (in the backward pass)"
        return [_finding("nonfinite", "error", [first["module"]],
                         f"The first {first['value'].upper()} appears in the {where} of '{first['module']}' "
                         f"at step {first_step}; everything after it is poisoned.",
                         {"step": first_step, "phase": first["phase"], "value": first["value"],
                          "events": len(events)}, ctx)]
    latest = _latest(trace, "grad_norm")
    if latest is None:
        return []
    step, norms = latest
    bad = _depth_order(trace, step, [k for k, v in norms.items() if not math.isfinite(v)])
    if not bad:
        return []
    return [_finding("nonfinite", "error", bad, f"The gradient of '{bad[0]}' is not finite at step {step}.",
                     {"step": step}, ctx)]


def _time_rule(trace: Trace, ctx: dict, exploding: bool) -> list[Finding]:
    latest = _latest(trace, "time_grad_ratio")
    if latest is None:
        return []
    step, ratios = latest
    series = trace.series("time_grad_rms")
    found = []
    for layer in _depth_order(trace, step, list(ratios)):
        r = ratios[layer]
        if exploding:
            severity = _severity(r, TIME_EXPLODING_WARNING, TIME_EXPLODING_ERROR, below=False)
        else:
            severity = _severity(r, TIME_VANISHING_WARNING, TIME_VANISHING_ERROR)
        if severity is None:
            continue
        length = int(np.sum(~np.isnan(series[layer][1][-1]))) if layer in series else None
        kind = "exploding_through_time" if exploding else "vanishing_through_time"
        verb = "grows" if exploding else "decays"
        found.append(_finding(kind, severity, [layer],
                              f"The gradient reaching the first of {length} time steps of '{layer}' is {r:.1e} of "
                              f"that at the last: it {verb} through time.",
                              {"step": step, "first_over_last": r, "length": length}, ctx))
    return found


def vanishing_through_time(trace: Trace, ctx: dict) -> list[Finding]:
    return _time_rule(trace, ctx, exploding=False)


def exploding_through_time(trace: Trace, ctx: dict) -> list[Finding]:
    return _time_rule(trace, ctx, exploding=True)


def gradient_underflow(trace: Trace, ctx: dict) -> list[Finding]:
    if not ctx.get("low_precision"):
        return []
    return _per_layer_share(trace, "grad_zero_frac", "gradient_underflow", UNDERFLOW_WARNING, UNDERFLOW_WARNING,
                            UNDERFLOW_ERROR, lambda k, v: f"{100 * v:.0f}% of the {trace.meta.get('dtype')} "
                            f"gradient entries of '{k}' are exactly zero: they flushed to zero", ctx)


def stalled_updates(trace: Trace, ctx: dict) -> list[Finding]:
    if "update_to_weight" not in trace.metrics:
        return []
    column = trace.metric("update_to_weight")
    medians = {}
    for j, layer in enumerate(trace.layers):
        values = column[:, j][~np.isnan(column[:, j])]
        if values.size:
            medians[layer] = float(np.median(values))
    if not medians:
        return []
    step = int(trace.steps[-1])
    stalled = _depth_order(trace, step, [k for k, v in medians.items() if v < STALLED_WARNING])
    if not stalled:
        return []
    worst = min(medians[k] for k in stalled)
    severity = _severity(worst, STALLED_WARNING, STALLED_ERROR)
    assert severity is not None
    return [_finding("stalled_updates", severity, stalled,
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
