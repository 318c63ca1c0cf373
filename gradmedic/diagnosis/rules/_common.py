"""What the rules share: reading a metric at its latest and first steps, a run scalar in step order, depth order,
severity, a per-layer share rule, and making a Finding (with its remedies ranked by the registry)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._registry import prescribe
from gradmedic.trace import Trace


def scalar_in_order(trace: Trace, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The run scalar ``name`` (the loss, the lr, the loss scale) as (steps, float64 values) in step order, or None
    where it was not recorded: the chunks of a trace need not come in order."""
    if name not in trace.scalar_names:
        return None
    steps, values = trace.scalar(name)
    order = np.argsort(steps, kind="stable")
    return steps[order], np.asarray(values, dtype=np.float64)[order]


def latest(trace: Trace, metric: str) -> tuple[int, dict[str, float]] | None:
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


def plain_blocks(trace: Trace) -> bool:
    """Whether the model's blocks (``roles``) are a plain stack: the backward probe read none of them to add its
    input back (``skip_path``), e.g. a user's "Block"s of conv, norm and activation, named like residual blocks, or
    an EfficientNet whose blocks all change shape. Their outputs still make the depth profile, but it is no residual
    stream: the plain thresholds and words apply. One block with a skip keeps them a stream (MobileNetV2's strided
    blocks have none, its others do)."""
    if "skip_path" not in trace.metrics:
        return False
    skip = trace.last("skip_path")
    known = [skip[name] for name, role in trace.meta.get("roles", {}).items() if role == "block" and name in skip]
    return bool(known) and not any(known)


def depth_order(trace: Trace, step: int, layers: list[str]) -> list[str]:
    """``layers`` in the order they first ran in the forward. A layer that never ran as a module (the
    ``out_proj`` of ``nn.MultiheadAttention``, whose weights the attention uses directly) takes its
    nearest ancestor's place, just after it; one with no measured ancestor goes by definition order."""
    module_order = {name: i for i, name in enumerate(trace.meta.get("modules", []))}
    index: dict[str, float] = {}
    if "forward_index" in trace.metrics:
        s = int(np.searchsorted(trace.steps, step))
        column = trace.metric("forward_index")[s]
        index = {layer: float(column[j]) for j, layer in enumerate(trace.layers) if not math.isnan(column[j])}

    def key(name: str) -> tuple[float, float, int]:
        if name in index:
            return index[name], 0.0, module_order.get(name, 0)
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:cut])
            if parent in index:
                return index[parent], 0.5, module_order.get(name, 0)
        return math.inf, 0.0, module_order.get(name, 0)

    return sorted(layers, key=key)


def severity_of(value: float, warning: float, error: float, below: bool = True,
                info: float | None = None) -> str | None:
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


def finding(kind: str, severity: str, layers: list[str], message: str, evidence: dict, ctx: Context) -> Finding:
    return Finding(kind=kind, severity=severity, layers=layers, message=message, evidence=evidence,
                   remedies=prescribe(kind, ctx))


# --- the rules ---------------------------------------------------------------------------------------
def per_layer_share(trace: Trace, metric: str, kind: str, info: float, warning: float, error: float,
                     describe: Callable[[str, float], str], ctx: Context,
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
    first = first_measured(trace, metric)
    if first is not None and first[0] < step:
        evidence["at_first_step"] = {k: first[1].get(k) for k in flagged}
    return [finding(kind, severity, flagged, describe(flagged[0], values[flagged[0]]) +
                     (f" ({len(flagged) - 1} more layer(s))" if len(flagged) > 1 else ""), evidence, ctx)]


def first_measured(trace: Trace, metric: str) -> tuple[int, dict[str, float]] | None:
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
