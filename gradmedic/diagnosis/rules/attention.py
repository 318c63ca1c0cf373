"""The rule of attention logits that grow without bound (attention_logit_growth), read from the attention probe's
``attn_logit_max`` per attention layer, with a forecast of when the growth passes the level at which runs diverge.

Large attention logits make the softmax one-hot: its entropy collapses, the gradients through it vanish for all but
one position and the loss diverges or stalls soon after (Dehghani et al. 2023; Zhai et al. 2023). The growth is
geometric under a too-hot learning rate and takes hundreds of steps, so it can be seen coming: the rule warns on a
logit that is already large and grows steadily toward DIVERGED_LOGIT, and says when it passes it at this rate.

Where the logits are not materialised (SDPA, ``attn_logit_bound`` 1) the reading is an upper bound: below a level it
proves the logits are too; past DIVERGED_LOGIT it says they may be (a warning, not the error an exact reading gives).
"""

from __future__ import annotations

import math

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import depth_order, finding
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.diagnosis.rules._trend import MIN_POINTS, Forecast, forecast
from gradmedic.trace import Trace

__all__ = ["attention_logit_growth"]

# Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", sec. 3.1): every
# run whose max attention logit passed about 1e4 diverged; with QK-layernorm the logits stayed far below. Passed: an
# error.
DIVERGED_LOGIT = 1e4
# A logit below this is no concern however fast it grows: at init logits are O(1) and healthy runs grow them by 5-10x
# while they learn (the corpus's healthy GPTs settle at 8 with QK-norm and 17 with warmup and clipping, Wortsman et
# al.'s stable runs stay within 1e2), so early growth alone is not a drift. At 50 the softmax gives a position 50
# nats ahead of the others all of the weight in float32 (exp(-50) ~ 2e-22, far below float32's 1e-7 relative
# precision): rows can be one-hot already.
WATCH_LOGIT = 50.0
# The same watch level for a bound (SDPA and flash kernels: max|q| max|k| / sqrt(d), ``attn_logit_bound``). A bound
# overshoots: a healthy GPT-NeoX learning a copy task (hf Trainer, Adam 3e-3) read 47-83 by its bound under SDPA while
# its exact max logit under eager attention was 21-42 over the same steps, and the bound grew x5-8 per 100 steps while
# the attention sharpened, then levelled off. Wortsman et al. 2023's stable runs stay within 1e2, so a bound below it
# proves the logits are in the stable range; only past it does a bound's growth count.
WATCH_BOUND = 100.0
# Growth per 100 steps that counts as a drift: doubling. The failing corpus GPT grows x2-x13 per 100 steps from step
# 50 on; a settling run's recent factor falls to ~1.
GROWTH_PER_100 = 2.0
# How far ahead a forecast warns: a drift that passes DIVERGED_LOGIT within this many steps at its recent rate.
# Wortsman et al. see the growth over a few thousand steps; beyond that a geometric extrapolation means little.
HORIZON_STEPS = 3000


def _column(trace: Trace, metric: str, j: int) -> tuple[np.ndarray, np.ndarray]:
    values = trace.metric(metric)[:, j]
    keep = ~np.isnan(values)
    return trace.steps[keep], values[keep]


def _drifting(steps: np.ndarray, values: np.ndarray, watch: float = WATCH_LOGIT) -> Forecast | None:
    """The forecast of a logit that is large and grows steadily toward DIVERGED_LOGIT, else None. Steady: the
    window's fit and its last MIN_POINTS points' both grow by GROWTH_PER_100 or more, so a logit that grew and then
    settled (a warmup transient) stops counting as soon as its recent points flatten."""
    if values.size < MIN_POINTS or not values[-1] >= watch:
        return None
    whole = forecast(steps, values, DIVERGED_LOGIT)
    recent = forecast(steps, values, DIVERGED_LOGIT, window=MIN_POINTS)
    if whole is None or recent is None or whole.steps_to_threshold is None:
        return None
    if min(whole.factor_per_100, recent.factor_per_100) < GROWTH_PER_100:
        return None
    return whole if whole.steps_to_threshold <= HORIZON_STEPS else None


def attention_logit_growth(trace: Trace, ctx: Context) -> list[Finding]:
    if "attn_logit_max" not in trace.metrics or not len(trace.steps):
        return []
    bound = trace.metric("attn_logit_bound") if "attn_logit_bound" in trace.metrics else None
    passed: dict[str, tuple[int, float]] = {}
    drifting: dict[str, Forecast] = {}
    is_bound: dict[str, bool] = {}
    for j, layer in enumerate(trace.layers):
        steps, values = _column(trace, "attn_logit_max", j)
        if not values.size:
            continue
        is_bound[layer] = bool(bound is not None and np.nanmax(bound[:, j], initial=0) > 0)
        if values[-1] >= DIVERGED_LOGIT:  # inf counts; NaN is the nonfinite rule's
            passed[layer] = (int(steps[-1]), float(values[-1]))
            continue
        f = _drifting(steps, values, WATCH_BOUND if is_bound[layer] else WATCH_LOGIT)
        if f is not None:
            drifting[layer] = f
    if not passed and not drifting:
        return []
    at = int(trace.steps[-1])
    if passed:
        layers = depth_order(trace, at, list(passed))
        worst = max(layers, key=lambda k: passed[k][1])
        step, value = passed[worst]
        if is_bound[worst]:
            # an upper bound past the level says the logits may have passed it, not that they did (it overshoots by
            # up to sqrt(d_head) on unaligned q and k; tests/test_attention_probe.py): a warning, never an error
            message = (f"The max attention logit at '{worst}' may be past {DIVERGED_LOGIT:.0e}: its bound from the "
                       f"queries' and keys' norms is {value:.3g} at step {step} (the logits themselves are not "
                       "materialised); every run past it diverged in Wortsman et al. 2023.")
            severity = "warning"
        else:
            message = (f"The max attention logit at '{worst}' is {value:.3g} at step {step}, past "
                       f"{DIVERGED_LOGIT:.0e}: every run that passed it diverged in Wortsman et al. 2023; the "
                       "attention is near one-hot.")
            severity = "error"
        evidence: dict = {"step": step, "threshold": DIVERGED_LOGIT,
                          **{f"attn_logit_max[{k}]": passed[k][1] for k in layers}}
    else:
        layers = depth_order(trace, at, list(drifting))
        worst = min(layers, key=lambda k: drifting[k].steps_to_threshold or 0.0)
        f = drifting[worst]
        message = (f"{f.says(f'The max attention logit at {worst!r}', DIVERGED_LOGIT)} (now {f.last_value:.3g} at "
                   f"step {f.last_step}{_bound_note(is_bound[worst])}); runs past {DIVERGED_LOGIT:.0e} diverged in "
                   "Wortsman et al. 2023.")
        severity = "warning"
        evidence = {"step": f.last_step, "threshold": DIVERGED_LOGIT, "factor_per_100": f.factor_per_100,
                    "steps_to_threshold": f.steps_to_threshold, "r2": f.r2,
                    **{f"attn_logit_max[{k}]": drifting[k].last_value for k in layers}}
    if len(layers) > 1:
        message += f" ({len(layers) - 1} more attention layer(s))"
    evidence["bound"] = int(is_bound[worst])
    evidence.update(_entropy(trace, worst))
    return [finding("attention_logit_growth", severity, [worst] + [k for k in layers if k != worst], message,
                    evidence, ctx)]


def _bound_note(is_bound: bool) -> str:
    return ", a bound from the queries' and keys' norms" if is_bound else ""


def _entropy(trace: Trace, layer: str) -> dict[str, float]:
    """The layer's attention entropy at its first and last measurement, where it was seen (Zhai et al. 2023)."""
    if "attn_entropy" not in trace.metrics:
        return {}
    _, values = _column(trace, "attn_entropy", trace.layers.index(layer))
    values = values[np.isfinite(values)]
    if not values.size or math.isnan(values[-1]):
        return {}
    return {"attn_entropy_first": float(values[0]), "attn_entropy_last": float(values[-1])}


# --- remedies, ranked --------------------------------------------------------------------------------
def rank_attention_logit_growth(ctx: Context) -> list[str]:
    # QK-norm bounds the logits by construction (Dehghani et al. 2023; Wortsman et al. 2023: it removes the
    # instability at every learning rate tried); warmup and a lower learning rate slow the growth; clipping the
    # gradient norm limits each step's push but not the drift
    return ["qk_norm", "lr_warmup", "lower_learning_rate", "clip_grad_norm"]


register(Rule("attention_logit_growth", attention_logit_growth, rank_attention_logit_growth,
              {None: ("qk_norm",)}))
