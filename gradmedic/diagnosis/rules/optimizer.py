"""The rules of the optimizer's state: Adam's second moment at its epsilon, updates far larger than the weights they
change, and a float16 loss scale that collapses. Each judges the state at the trace's last step (a diagnosis mid-run
equals the end's cut there) and, where the signal drifts, says when at its recent rate it passes its threshold
(``rules/_trend.py``)."""

from __future__ import annotations

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import depth_order, finding, latest
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.diagnosis.rules._trend import forecast
from gradmedic.trace import Trace

__all__ = ["adam_epsilon", "loss_scale_collapse", "update_too_large"]

# --- Adam's epsilon ----------------------------------------------------------------------------------------------
# Adam's step is m_hat / (sqrt(v_hat) + eps). With the typical entry's sqrt(v_hat) at 10x eps, eps takes a tenth of its
# step (a warning: the gradients are shrinking toward it); at 1x, half, and the updates collapse with the gradient
# (Wortsman et al. 2023, sec. 3.4: the update RMS falls once the gradient RMS nears eps; a smaller eps restores it).
# The healthy runs of the issue-26 corpus keep it above 2e3.
EPS_MARGIN_WARNING = 10.0
EPS_MARGIN_ERROR = 1.0
# The same read entry by entry: a quarter (half) of a layer's entries with sqrt(v_hat) below eps.
EPS_SHARE_WARNING = 0.25
EPS_SHARE_ERROR = 0.5

# --- updates -----------------------------------------------------------------------------------------------------
# ||W_s - W_{s-1}|| / ||W_{s-1}||: ~1e-3 is healthy (Karpathy's rule of thumb, rules/updates.py). 100x that is a step
# that rewrites a tenth of the layer (the corpus's healthy runs stay under 0.07 after warmup; its high-lr runs pass
# 0.15 before they diverge); at 1 or more a step is as large as the weights it changes.
UPDATE_WARNING = 0.1
UPDATE_ERROR = 1.0
# The first steps are a transient, not a rate: Adam's first update moves every entry by about lr whatever the gradient
# (m_hat / sqrt(v_hat) = +-1, Kingma & Ba 2015 sec. 3), and its v comes from a handful of batches (Liu et al. 2020,
# RAdam: the adaptive rate's variance is large early). Ratios measured before this step are not judged.
UPDATE_SETTLE = 10
# Plain SGD's first update is lr x the gradient (with momentum too: its buffer starts as the first gradient), a rate
# like any later one, so its steps are judged from the first (the Monitor measures steps 1, 3, 7 and 15:
# gradmedic._first_look) while any other optimizer's, or none named (the trace's meta["optimizer"]), wait
# UPDATE_SETTLE steps. Before WHOLE_NET_UNTIL (the first looks) a step is judged by the median layer, not the largest:
# at init a small head's ratio is its init scale against the loss's first gradients (a healthy 8-32-1 ReLU net at SGD
# 0.05 moves its 32->1 head by 0.11 at step 1 and its first layer by 0.006, and trains), while a too-hot lr moves the
# whole net: the issue-26 corpus's hot runs' median layer reads 0.17 at step 1 (lr 3.0, diverged at step 3) and 0.14
# at step 3 (lr 0.5, diverged at 21), its healthy SGD runs' 0.003 or less. You et al. 2017 (LARS, table 1) measure
# |g|/|w| up to 0.17 at init (AlexNet-BN conv1): a 0.1 step there needs an lr near 0.6, where large-batch SGD diverged
# unwarmed.
RATE_FROM_FIRST_STEP = frozenset({"SGD"})
WHOLE_NET_UNTIL = 16

# --- float16 loss scale ------------------------------------------------------------------------------------------
# torch.amp.GradScaler halves its scale at every step whose gradients overflow (and skips that step), and doubles it
# after 2000 steps without one: at equilibrium a healthy run skips about one step in 2000. SKIPS_WARNING halvings
# within SKIP_WINDOW steps mean most steps overflow and are skipped; below a scale of 1 the loss is scaled down, and
# the float16 gradients underflow sooner than with no scaling at all (Micikevicius et al. 2018). BigScience's 104B
# chronicles: the scale fell for 1-2k steps before the divergence.
SKIPS_WARNING = 3
SKIP_WINDOW = 20
LOSS_SCALE_ERROR = 1.0
# Halvings before the scale first held for this many steps are GradScaler finding its level at the start (2^16 is a
# guess, too high for most models): a warmup transient.
SCALE_SETTLED = 10


def adam_epsilon(trace: Trace, ctx: Context) -> list[Finding]:
    """Layers whose typical Adam entry has sqrt(v_hat) within EPS_MARGIN_WARNING of eps (or a share of entries
    below it), with a forecast of when the margin passes 1."""
    margin = latest(trace, "adam_rms_to_eps")
    if margin is None:
        return []
    step, margins = margin
    shares = latest(trace, "adam_eps_share")
    share = shares[1] if shares is not None and shares[0] == step else {}
    hit = [k for k, v in margins.items() if v < EPS_MARGIN_WARNING or share.get(k, 0.0) >= EPS_SHARE_WARNING]
    if not hit:
        return []
    hit = depth_order(trace, step, hit)
    error = [k for k in hit if margins[k] < EPS_MARGIN_ERROR or share.get(k, 0.0) >= EPS_SHARE_ERROR]
    worst = min(hit, key=lambda k: margins[k])
    column = trace.metric("adam_rms_to_eps")[:, trace.layers.index(worst)]
    rows = np.isfinite(column)
    trend = forecast(trace.steps[rows], column[rows], EPS_MARGIN_ERROR, below=True)
    said = ""
    if trend is not None and trend.factor_per_100 < 1:
        said = "; " + trend.says("it", EPS_MARGIN_ERROR).replace("grows", "shrinks").replace("passes", "falls below")
    evidence = {"step": step, "worst": worst, "margin": margins[worst], "eps_share": share.get(worst),
                **{f"adam_rms_to_eps[{k}]": margins[k] for k in hit}}
    if trend is not None:
        evidence.update(factor_per_100=trend.factor_per_100, steps_to_threshold=trend.steps_to_threshold)
    below = f" and {share[worst]:.0%} of its entries are below it" if worst in share else ""
    return [finding("adam_epsilon", "error" if error else "warning", hit,
                    f"Adam's eps is near the gradient's scale: in '{worst}' the typical entry's sqrt(v_hat) is "
                    f"{margins[worst]:.2g}x eps{below}{said}; its updates shrink with the gradient instead of staying "
                    "near the learning rate.", evidence, ctx)]


def update_too_large(trace: Trace, ctx: Context) -> list[Finding]:
    """Layers whose latest update/weight ratio is UPDATE_WARNING or more."""
    measured = latest(trace, "update_to_weight")
    settle = 0 if trace.meta.get("optimizer") in RATE_FROM_FIRST_STEP else UPDATE_SETTLE
    if measured is None or measured[0] < settle:
        return []
    step, ratios = measured
    finite = [v for v in ratios.values() if np.isfinite(v)]
    if step < WHOLE_NET_UNTIL and not (finite and float(np.median(finite)) >= UPDATE_WARNING):
        return []  # an early step: the whole net's (its median layer's), not one layer's
    hit = depth_order(trace, step, [k for k, v in ratios.items() if v >= UPDATE_WARNING])
    if not hit:
        return []
    worst = max(ratios[k] for k in hit)
    top = max(hit, key=lambda k: ratios[k])
    severity = "error" if worst >= UPDATE_ERROR else "warning"
    more = f" ({len(hit) - 1} more layer{'s' * (len(hit) != 2)})" if len(hit) > 1 else ""
    return [finding("update_too_large", severity, hit,
                    f"One optimizer step changes '{top}' by {worst:.2g} of its size at step {step}{more}: about 100x "
                    "and more the healthy 1e-3; the learning rate is too high for it.",
                    {"step": step, **{f"update_to_weight[{k}]": ratios[k] for k in hit}}, ctx)]


def loss_scale_collapse(trace: Trace, ctx: Context) -> list[Finding]:
    """The GradScaler's scale (run scalar ``loss_scale``) halving at most steps, or below 1."""
    if "loss_scale" not in trace.scalar_names:
        return []
    steps, scale = trace.scalar("loss_scale")
    keep = np.isfinite(scale) & (scale > 0)
    steps, scale = steps[keep], scale[keep]
    if scale.size < 2:
        return []
    halved = np.concatenate([[False], scale[1:] < scale[:-1]])
    settled, run = None, 0
    for i, h in enumerate(halved):  # the first step by which the scale held for SCALE_SETTLED steps
        run = 0 if h else run + 1
        if run >= SCALE_SETTLED:
            settled = i
            break
    if settled is None and scale[-1] >= LOSS_SCALE_ERROR:
        return []  # still finding its level
    counted = halved & (np.arange(scale.size) > (settled if settled is not None else -1))
    recent = int(np.sum(counted & (steps > steps[-1] - SKIP_WINDOW)))
    now, step = float(scale[-1]), int(steps[-1])
    if now >= LOSS_SCALE_ERROR and recent < SKIPS_WARNING:
        return []
    trend = forecast(steps, scale, LOSS_SCALE_ERROR, below=True)
    said = "" if trend is None or now < LOSS_SCALE_ERROR or trend.steps_to_threshold is None else \
        f"; at this rate it falls below {LOSS_SCALE_ERROR:g} in about {trend.steps_to_threshold:.0f} steps"
    severity = "error" if now < LOSS_SCALE_ERROR else "warning"
    return [finding("loss_scale_collapse", severity, [],
                    f"The float16 loss scale is collapsing: {now:.3g} at step {step}, halved {recent} times in the "
                    f"last {SKIP_WINDOW} steps (each a skipped step whose gradients overflowed){said}.",
                    {"step": step, "loss_scale": now, "halvings": recent, "peak": float(scale.max())}, ctx)]


# --- remedies, ranked --------------------------------------------------------------------------------------------
# Adam's eps: lower it first (Wortsman et al. 2023: 1e-15 restored the updates; Molybog et al. 2023); updates too
# large: the learning rate and its warmup first, then clipping, then beta2 (Zhai et al. 2023); the loss scale: find
# the overflowing layer or use bfloat16, then the learning rate (an overflow is often a growing activation).
def rank_epsilon(ctx: Context) -> list[str]:
    return ["lower_adam_epsilon", "raise_learning_rate"]


def rank_update(ctx: Context) -> list[str]:
    return ["lower_learning_rate", "lr_warmup", "clip_grad_norm", "lower_beta2"]


def rank_loss_scale(ctx: Context) -> list[str]:
    return ["loss_scale_floor", "higher_precision", "lower_learning_rate", "clip_grad_norm"]


register(Rule("adam_epsilon", adam_epsilon, rank_epsilon))
register(Rule("update_too_large", update_too_large, rank_update))
register(Rule("loss_scale_collapse", loss_scale_collapse, rank_loss_scale))
