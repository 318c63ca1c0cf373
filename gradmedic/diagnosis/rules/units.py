"""The unit rules: saturated units (sigmoid/tanh-like outputs where the derivative is near zero) and dead units
(ReLU-family units off for every input), read per layer at the latest measured step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import finding, latest, per_layer_share
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.trace import Trace

__all__ = ["binomial_tail", "dead_units", "learned_saturation", "saturated_units"]

# --- units -------------------------------------------------------------------------------------------
# Share of a layer's outputs whose derivative is below 5% of its peak (probes.activations). 30% means a
# third of the layer passes on almost nothing; 80% means the layer is close to a wall.
SATURATED_INFO = 0.1
SATURATED_WARNING = 0.3
SATURATED_ERROR = 0.8
# Those shares are init-time reasoning (Glorot & Bengio 2010: a net saturated before it learns passes nothing
# back). A net that learns drives units to +-1 where the loss wants them: the training corpus's tanh MLP on digits
# (tests/training_runs.py, healthy_adam_eps_default) reads 18% saturated at step 100 and 34% at step 400 while its
# loss falls from 2.3 to 0.002. A layer's share is learned when, at the first step it read SATURATED_WARNING or
# more, the run's loss had already fallen below LEARNED_LOSS_FALL of its start: the trainability grid's test of
# "it trains" (benchmarks/trainability.py: final loss below half the baseline). Then it is information below
# SATURATED_ERROR; a layer that was saturated from the first step (a bad init, a confident head under MSE) is judged
# as before. Losses are read as the median of LOSS_WINDOW steps (one batch is noisy); a loss that starts at or
# below zero (a flow's NLL can) has no such fall, and its saturation is judged as before.
LEARNED_LOSS_FALL = 0.5
LOSS_WINDOW = 10
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



def saturated_units(trace: Trace, ctx: Context) -> list[Finding]:
    # an activation the loss cancels (a sigmoid read by a binary cross-entropy: the gradient at its logit is
    # p - y, sigmoid' divides out; gm.check reads it from the loss's graph, meta["loss_matched"]) is saturated
    # because it is confident: when it is right the gradient is small because the error is, and when it is wrong
    # the full error passes (the corpus's confident head: mean |dL/dlogit| x N 0.90 on its saturated wrong
    # outputs, 240x its MSE twin's). Information, never a warning.
    # Likewise a tanh inside an attention's scoring (meta["scoring"]: its output reaches the loss only through a
    # softmax): it saturates as the attention sharpens, as a trained additive attention's does (the corpus's GRU
    # seq2seq, trained to 0.73 held-out accuracy, reads 30%+ there): the values the attention mixes pass by it.
    matched = set(trace.meta.get("loss_matched", ()))
    scoring = set(trace.meta.get("scoring", ())) - matched
    learned = {k: fall for k, fall in learned_saturation(trace).items() if k not in matched and k not in scoring}
    found = per_layer_share(trace, "saturated_frac", "saturated_units", SATURATED_INFO, SATURATED_WARNING,
                            SATURATED_ERROR, lambda k, v: f"{100 * v:.0f}% of the activations at '{k}' are saturated "
                            "(derivative below 5% of its peak), so little gradient passes through it", ctx,
                            keep=lambda k, v: k not in matched and k not in scoring and
                            (k not in learned or v >= SATURATED_ERROR))
    if learned:
        trained = per_layer_share(trace, "saturated_frac", "saturated_units", SATURATED_INFO, SATURATED_INFO,
                                  SATURATED_INFO, lambda k, v: f"{100 * v:.0f}% of the activations at '{k}' are "
                                  f"saturated, but they saturated as the net learned (the loss already at "
                                  f"{learned[k]:.2g} of its start): a trained net drives units to their bounds where "
                                  "the loss wants them", ctx, keep=lambda k, v: k in learned and v < SATURATED_ERROR)
        found += [replace(f, severity="info", evidence={**f.evidence, "learned": {k: learned[k] for k in f.layers}})
                  for f in trained]
    if matched:
        cancelled = per_layer_share(trace, "saturated_frac", "saturated_units", SATURATED_INFO, SATURATED_INFO,
                                    SATURATED_INFO, lambda k, v: f"{100 * v:.0f}% of the outputs of '{k}' are "
                                    "saturated, but the loss that reads them cancels its derivative (the gradient at "
                                    "the logit is p - target): they are confident, and no gradient is lost there",
                                    ctx, keep=lambda k, v: k in matched)
        found += [replace(f, severity="info", evidence={**f.evidence, "loss_cancels": True}) for f in cancelled]
    if scoring:
        scores = per_layer_share(trace, "saturated_frac", "saturated_units", SATURATED_INFO, SATURATED_INFO,
                                 SATURATED_INFO, lambda k, v: f"{100 * v:.0f}% of the activations at '{k}' are "
                                 "saturated, but they only score an attention (its output reaches the loss through a "
                                 "softmax alone): a sharp attention saturates them, and the values it mixes pass by",
                                 ctx, keep=lambda k, v: k in scoring)
        found += [replace(f, severity="info", evidence={**f.evidence, "scores_attention": True}) for f in scores]
    return found


def learned_saturation(trace: Trace) -> dict[str, float]:
    """Layers whose saturated share first reached SATURATED_WARNING after the run's loss had fallen below
    LEARNED_LOSS_FALL of its start, each with that fall (loss then / loss at the start)."""
    if "saturated_frac" not in trace.metrics or "loss" not in trace.scalar_names:
        return {}
    steps, losses = trace.scalar("loss")
    order = np.argsort(steps, kind="stable")
    steps, losses = steps[order], np.asarray(losses, dtype=np.float64)[order]
    finite = np.isfinite(losses)
    steps, losses = steps[finite], losses[finite]
    if losses.size == 0:
        return {}
    start = float(np.median(losses[:LOSS_WINDOW]))
    if not start > 0:
        return {}
    column, rows = trace.metric("saturated_frac"), trace.steps
    out = {}
    for j, layer in enumerate(trace.layers):
        high = np.flatnonzero(column[:, j] >= SATURATED_WARNING)  # NaN (not measured) compares False
        if high.size == 0:
            continue
        upto = int(np.searchsorted(steps, rows[high[0]], side="right"))
        if upto == 0:
            continue
        fall = float(np.median(losses[max(0, upto - LOSS_WINDOW):upto])) / start
        if fall < LEARNED_LOSS_FALL:
            out[layer] = fall
    return out


def dead_units(trace: Trace, ctx: Context) -> list[Finding]:
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


def _dead_units(trace: Trace, ctx: Context, keep: Callable[[str, float], bool] | None = None) -> list[Finding]:
    return per_layer_share(trace, "dead_frac", "dead_units", DEAD_INFO, DEAD_WARNING, DEAD_ERROR,
                            lambda k, v: f"{100 * v:.0f}% of the units at '{k}' are dead (zero for every sample), "
                            "so their incoming weights get no gradient", ctx, keep=keep)


def binomial_tail(n: int, k: int, p: float) -> float:
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
        return binomial_tail(n, k, DEAD_CHANCE) < DEAD_SIGNIFICANCE

    return keep


# --- remedies, ranked --------------------------------------------------------------------------------
def rank_saturated(ctx: Context) -> list[str]:
    return ["swap_activation", "add_normalization", "xavier_init", "lsuv_init", "recycle_dormant"]


def rank_dead(ctx: Context) -> list[str]:
    return ["recycle_dormant", "he_init", "swap_activation", "add_normalization", "lower_learning_rate"]


register(Rule("saturated_units", saturated_units, rank_saturated))
register(Rule("dead_units", dead_units, rank_dead))
