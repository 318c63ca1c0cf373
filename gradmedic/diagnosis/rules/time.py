"""The rules through time: the gradient reaching a recurrent layer's first time steps against its last, from the
loss at every step and from the last output alone (the horizon)."""

from __future__ import annotations

import math

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import depth_order, finding, latest, severity_of
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.trace import Trace

__all__ = ["exploding_through_time", "vanishing_through_time"]

# --- time ------------------------------------------------------------------------------------------
# dL/dx at the first step over dL/dx at the last (probes.timesteps). 1e-3: the first steps get 1000x
# less gradient than the last, the regime where a tanh RNN fails the adding problem (Hochreiter 1991;
# Bengio et al. 1994). Error at 1e-6.
TIME_VANISHING_WARNING = 1e-3
TIME_VANISHING_ERROR = 1e-6
TIME_EXPLODING_WARNING = 1e3
TIME_EXPLODING_ERROR = 1e6



def _time_rule(trace: Trace, ctx: Context, exploding: bool) -> list[Finding]:
    measured = latest(trace, "time_grad_ratio")
    horizon = latest(trace, "horizon_ratio")
    if measured is None and horizon is None:
        return []
    step, ratios = measured if measured is not None else horizon
    reach = horizon[1] if horizon is not None else {}
    series = trace.series("time_grad_rms")
    horizon_series = trace.series("horizon_rms")
    # layers whose every output an attention reads (gm.check, from the loss's graph): a decoder that attends over an
    # encoder's states reaches each step directly, so the horizon of the last output is not what it can learn from
    # (issue 28 class 3: an LSTM encoder's last-output horizon 6.7e-05 over 20 steps, yet reversal of 20 tokens
    # reaches 0.84 held-out accuracy through attention); the loss's own gradient through time says it
    attended = set(trace.meta.get("attended", ()))
    found = []
    for layer in depth_order(trace, step, sorted(set(ratios) | set(reach))):
        # the loss's own gradient through time, and the horizon: how much of the last output's gradient
        # reaches the first step. With a loss at every step the first stays flat while the second vanishes
        # (a language model cannot learn what lies beyond its horizon), so vanishing reads the smaller.
        total, last_only = ratios.get(layer, math.nan), reach.get(layer, math.nan)
        if layer in attended and math.isfinite(total):
            last_only = math.nan
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


def vanishing_through_time(trace: Trace, ctx: Context) -> list[Finding]:
    return _time_rule(trace, ctx, exploding=False)


def exploding_through_time(trace: Trace, ctx: Context) -> list[Finding]:
    return _time_rule(trace, ctx, exploding=True)


# --- remedies, ranked --------------------------------------------------------------------------------
# For a tanh RNN gates beat init (Hochreiter & Schmidhuber 1997; the lab's adding problem); an LSTM keeps its memory
# with a forget-gate bias of 1 (Gers et al. 2000; Jozefowicz et al. 2015).
def rank_vanishing_time(ctx: Context) -> list[str]:
    if ctx.lstm:
        return ["forget_gate_bias", "orthogonal_init", "clip_grad_norm"]
    if ctx.gru:
        return ["orthogonal_init", "clip_grad_norm"]
    return ["gated_recurrence", "identity_recurrent_init", "orthogonal_init"]


def rank_exploding_time(ctx: Context) -> list[str]:
    return ["clip_grad_norm", "orthogonal_init", "gated_recurrence" if ctx.rnn else "lower_learning_rate"]


register(Rule("vanishing_through_time", vanishing_through_time, rank_vanishing_time))
register(Rule("exploding_through_time", exploding_through_time, rank_exploding_time))
