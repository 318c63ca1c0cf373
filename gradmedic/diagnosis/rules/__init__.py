"""The rules: a trace in, findings out. One file per family of kinds, each rule beside its thresholds (named
constants, each with where its number comes from) and its remedy ranking, registered in one registry
(``_registry.RULES``):

- ``depth.py``: vanishing_gradients, exploding_gradients (along the residual stream, or every layer of a plain net)
- ``units.py``: saturated_units, dead_units
- ``time.py``: vanishing_through_time, exploding_through_time
- ``precision.py``: nonfinite, gradient_underflow
- ``updates.py``: stalled_updates, no_gradient
- ``dynamics.py``: untested_dynamics (what one look at init cannot show: a deep post-LN stack without warmup)
- ``training.py``: loss_spike, divergence, loss_stall, output_logit_drift, and the jump of the total gradient norm that
  ``exploding_gradients`` reports (the run's scalars and trends)
- ``optimizer.py``: adam_epsilon, update_too_large, loss_scale_collapse (the optimizer's state)
- ``attention.py``: attention_logit_growth (with a forecast of when the max attention logit passes 1e4)

Depth profiles are read at the latest step that measured them, with layers in the order they first ran in the
forward (``forward_index``), so a model defined in one order and called in another is read in depth order. The
profile rules compare each layer with the layers nearest the loss, so they do not depend on the loss's scale, the
batch size or the learning rate. A new kind: a file here (its rule, thresholds, ranking and ``register`` call), its
name in ``KINDS`` and the import below.
"""

from __future__ import annotations

from gradmedic.diagnosis.context import Context, context_of
from gradmedic.diagnosis.findings import KINDS, Finding
from gradmedic.diagnosis.rules import (  # noqa: F401  (each registers its rules)
    attention,
    depth,
    dynamics,
    optimizer,
    precision,
    time,
    training,
    units,
    updates,
)
from gradmedic.diagnosis.rules._registry import RULES, Rule, prescribe, register
from gradmedic.trace import Trace

__all__ = ["RULES", "Rule", "prescribe", "register", "run_rules"]


def run_rules(trace: Trace) -> tuple[list[Finding], Context]:
    """Every registered rule on ``trace``, in the order of ``KINDS``, and the Context they read."""
    ctx = context_of(trace)
    findings: list[Finding] = []
    for kind in sorted(RULES, key=lambda k: KINDS.index(k)):
        findings += RULES[kind].read(trace, ctx)
    if any(f.kind == "nonfinite" for f in findings):
        # NaN poisons every ratio: the profile rules would only repeat it
        # (a float16 loss scale that collapsed says how the overflow went, and stays)
        findings = [f for f in findings if f.kind in ("nonfinite", "gradient_underflow", "loss_scale_collapse")]
    return findings, ctx
