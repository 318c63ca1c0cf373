"""The rules of a training run as it goes: the loss spikes, the loss diverges, the total gradient norm jumps, the
output logits drift. They read the run scalars (the loss at every step, ``Trace.scalar``) and what the gradient and
output-logit probes measured at their steps, and judge the state at the trace's last step, so that a diagnosis
mid-run equals the end's cut at that step (``Trace.until``).

A loss that never leaves where it began is a stall (loss_stall); one that learned and levelled off is not.
A trend the literature calls benign is no alarm: a spike that comes back down (information), the gradient norm that
falls as the loss falls, a jump of the norm while the loss falls (a recurrent net learning to remember: its
recurrence's radius passes 1 as it learns), and the norm rising late in a run with weight decay (Defazio 2025),
which no rule here reads as a jump: it is slow.
"""

from __future__ import annotations

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import finding, scalar_in_order
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.diagnosis.rules._schedule import after_lr_jump
from gradmedic.diagnosis.rules._trend import forecast
from gradmedic.trace import Trace

__all__ = ["divergence", "gradient_jump", "loss_spike", "loss_stall", "output_logit_drift"]

# --- loss spikes -------------------------------------------------------------------------------------------------
# OLMo 2 (Team OLMo 2024, "2 OLMo 2 Furious", sec. 3.2): a spike is a value at least 7 standard deviations from the
# rolling mean of the values before it; its "spike score" is the share of such steps.
SPIKE_SIGMA = 7.0
# ...and at least 10% above that mean: on a nearly constant loss the standard deviation is tiny and 7 of them a rise
# nobody would call a spike (the corpus's post-LN run stuck at chance has a rolling sd of 0.5% of its mean: 7 sd is
# 3.5%). Every healthy run of the issue-26 corpus has a rolling sd of 2.4% of its mean or more (median 13-200%), so a
# rise under 10% is within a few batches' noise there; the smallest spike that mattered in the corpus rose by 116%
# (Lightning's SpikeDetection asks for 200% by default, rtol=2).
SPIKE_MIN_RISE = 0.1
# The rolling window: OLMo 2 reads 1000 steps of runs 1e5 steps long; a small run has a few hundred, and 50 steps hold
# enough batch noise for a standard deviation (20 at least before a first judgement).
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 20
# A spike is over when the loss is back within 3 standard deviations of the mean before it (the band of ordinary
# batch noise); one that is over is information at most (issue 26: a spike that recovers is no alarm).
RECOVER_SIGMA = 3.0
# Steps a spike must hold (the spike and the next) before it is a warning: a single bad batch at the last step is not
# yet told from one that stays (PaLM's spikes that did not recover held for tens of steps, Chowdhery et al. 2022).
SPIKE_CONFIRM = 2

# --- divergence --------------------------------------------------------------------------------------------------
# The loss is read smoothed: the median of the last 5 steps, so one bad batch (a spike) does not move it.
SMOOTH = 5
# The run gives back what it learned: the smoothed loss is above best + 25% of (start - best) and above 1.25x best for
# DIVERGE_HOLD steps (a warning while it starts); above best + 50% and 1.5x best for DIVERGE_LOST steps, it is lost (an
# error: the failure definition of the issue-26 corpus, tests/training_runs.py). A run that never learned is judged
# against its start: 1.25x (1.5x) the loss it began with.
DIVERGE_WARNING = (0.25, 1.25)
DIVERGE_ERROR = (0.5, 1.5)
DIVERGE_HOLD = 3
DIVERGE_LOST = 10

# --- a loss that never learns -------------------------------------------------------------------------------------
# A loss still within 10% of where it began (either way) has not learned: the issue-26 corpus's failure definition of
# a stall (tests/training_runs.py, STALL_FRACTION). The healthy runs there pass 10% below their start by step 50, the
# nearest only just (a GPT warmed up over 50 steps: 10.6% below at step 53): the flatness below is the margin.
STALL_FRACTION = 0.9
# ...and flat: over the last half of the run seen (STALL_WINDOW steps at least) its median over the window's last
# fifth is within 2% of its median over the first fifth, either way. The healthy runs of the corpus move 7% or more
# over every such window while they are within 12% of their start (3.5x the 2%); the post-LN run stuck at chance
# 0.4%. A run that learned and then levelled off (converged, or at the data's floor) is below STALL_FRACTION and
# never read as stalled.
STALL_WINDOW = 50
STALL_DROP = 0.02
STALL_PARTS = 5
# A flat stretch shorter than this is a plateau, said as information: a transformer's loss can sit near where it began
# before a phase change (Olsson et al. 2022: induction heads form in a sudden drop after a plateau). A GPT-NeoX on a
# copy task (hf Trainer, AdamW 3e-3, healthy) stayed within 10% of its start for 110 steps and moved 1.3% over the 50
# before step 79, then learned; the issue-26 corpus calls a run that has not learned by step 100 stalled
# (tests/training_runs.py, STALL_STEPS). A loss flat over 100 steps or more is a warning.
STALL_HOLD = 100
# While the learning rate still rises (a warmup: the lr at the window's end above 1.5x its start) a flat loss waits
# for it: no alarm.
STALL_LR_RISING = 1.5
# The steps of a stalled run said in its message: update/weight of the median layer above 1e-2 (update_too_large's
# range, optimizer.py) is a step too large to settle, below 1e-5 (stalled_updates') one too small to move.
STEPS_LARGE = 1e-2
STEPS_SMALL = 1e-5

# --- a jump of the total gradient norm ---------------------------------------------------------------------------
# Pascanu et al. 2013 (sec. 2.2): when a recurrence crosses a bifurcation (its spectral radius passes 1) the gradient
# jumps by an order of magnitude or more, and falls back as soon as it has crossed. The norm of the last JUMP_SMOOTH
# steps (their median: one measurement at the default cadence of 20, twenty at every step, where single batches jump
# 5-27x in healthy runs near zero loss) against the median of the JUMP_SPAN steps before them (10 measurements at the
# default cadence): 5x is beyond every healthy run of the issue-26 corpus (at most 2.4x where the loss was not
# falling), 1e3x is the run-growth rule's warning.
JUMP_WARNING = 5.0
JUMP_ERROR = 1e3
JUMP_SMOOTH = 20
JUMP_SPAN = 200
JUMP_MIN_HISTORY = 3
# A jump while the loss falls by a fifth or more over the same stretch is learning, not failing: a recurrent net's
# norm jumps x16 as its radius passes 1 and it learns to remember (the corpus's healthy_rnn_adam).
JUMP_LOSS_FALLING = 0.8
# One measurement up and every later one back within 2x of the median before it is one hard batch, as a loss spike that
# recovers (information), unless it was two orders of magnitude: a near-zero loss makes single batches jump up to 27x
# in the corpus's healthy runs (healthy_weight_decay_late_rise); an RNN's crossing of radius 1 does 660x (issue 26).
JUMP_BACK = 2.0
JUMP_ONE_BATCH = 100.0

# --- output logits ------------------------------------------------------------------------------------------------
# log Z = logsumexp(logits): 0 is what z-loss pins it to (PaLM, Chowdhery et al. 2022: 1e-4 log^2 Z); a classifier of
# V classes starts near log V (2.3 for 10, 10.8 for 50k). Wortsman et al. 2023 (fig. 5) see output-logit divergence as
# log Z drifting to tens and more. Past 30, logits of 30 and more: their bfloat16 spacing is 1/8 to 1/4 and a
# softmax over them no longer resolves the loss. A warning where it is forecast to pass LOG_Z_ERROR within
# LOG_Z_HORIZON steps at its recent rate, once it is past LOG_Z_FLOOR: a margin of 20 between logits is already past
# float32's resolution of 1 - p (e^-16 = 1.2e-7, its epsilon); below it the growth is a classifier learning to be
# confident (the corpus's healthy classifiers level off at 13-17).
LOG_Z_ERROR = 30.0
LOG_Z_FLOOR = 20.0
LOG_Z_HORIZON = 500


def _loss(trace: Trace) -> tuple[np.ndarray, np.ndarray] | None:
    return scalar_in_order(trace, "loss")


def _rolling(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation and count of the finite values among the ``window`` before each index."""
    finite = np.isfinite(values)
    x = np.where(finite, values, 0.0)
    c = np.concatenate([[0.0], np.cumsum(finite)])
    s = np.concatenate([[0.0], np.cumsum(x)])
    q = np.concatenate([[0.0], np.cumsum(x * x)])
    i = np.arange(len(values))
    lo = np.maximum(i - window, 0)
    n = c[i] - c[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (s[i] - s[lo]) / n
        var = np.maximum((q[i] - q[lo]) / n - mean * mean, 0.0)
    return mean, np.sqrt(var), n


def loss_spike(trace: Trace, ctx: Context) -> list[Finding]:
    """The latest loss spike (>= SPIKE_SIGMA standard deviations and SPIKE_MIN_RISE above the rolling mean): a warning
    while it holds, or information once the loss came back."""
    loss = _loss(trace)
    if loss is None:
        return []
    steps, values = loss
    mean, sd, n = _rolling(values, SPIKE_WINDOW)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (values - mean) / sd
        rise = values - mean >= SPIKE_MIN_RISE * np.abs(mean)
        spikes = np.flatnonzero((n >= SPIKE_MIN_HISTORY) & (sd > 0) & np.isfinite(values) & (z >= SPIKE_SIGMA) & rise)
    if spikes.size == 0:
        return []
    # a spike's run of high steps counts once: the first step of the last such run
    starts = spikes[np.concatenate([[True], np.diff(spikes) > 1])] if spikes.size else spikes
    i = int(starts[-1])
    band = mean[i] + RECOVER_SIGMA * sd[i]
    after = values[i + 1:]
    back = np.flatnonzero(np.isfinite(after) & (after <= band))
    evidence = {"step": int(steps[i]), "loss": float(values[i]), "rolling_mean": float(mean[i]),
                "sigmas": float(z[i]), "spikes": int(starts.size)}
    if back.size:
        held = int(back[0]) + 1
        return [finding("loss_spike", "info", [], f"The loss spiked to {values[i]:.3g} at step {int(steps[i])} "
                        f"({z[i]:.0f} standard deviations above its rolling mean {mean[i]:.3g}) and came back within "
                        f"{held} step{'s' * (held != 1)}.", {**evidence, "recovered_after": held}, ctx)]
    held = len(values) - i
    if held < SPIKE_CONFIRM:
        return [finding("loss_spike", "info", [], f"The loss spiked to {values[i]:.3g} at step {int(steps[i])}, the "
                        f"last step seen ({z[i]:.0f} standard deviations above its rolling mean {mean[i]:.3g}).",
                        evidence, ctx)]
    return [after_lr_jump(finding("loss_spike", "warning", [], f"The loss spiked to {values[i]:.3g} at step "
                                  f"{int(steps[i])} ({z[i]:.0f} standard deviations above its rolling mean "
                                  f"{mean[i]:.3g}) and has not come back in {held} steps.", {**evidence, "held": held},
                                  ctx), trace, int(steps[i]))]


def smoothed(values: np.ndarray) -> np.ndarray:
    """The median of the last SMOOTH finite values at each step (a non-finite loss counts as +inf: above any line)."""
    x = np.where(np.isnan(values), np.inf, values)
    if len(x) < SMOOTH:
        return np.full(len(x), np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(x, SMOOTH)
    return np.concatenate([np.full(SMOOTH - 1, np.nan), np.median(windows, axis=1)])


def _held(above: np.ndarray) -> int:
    """Steps at the end of ``above`` that are all True."""
    flips = np.flatnonzero(~above)
    return len(above) - (int(flips[-1]) + 1 if flips.size else 0)


def divergence(trace: Trace, ctx: Context) -> list[Finding]:
    """The smoothed loss rises well above the best it reached and stays there (see DIVERGE_*)."""
    loss = _loss(trace)
    if loss is None:
        return []
    steps, values = loss
    smooth = smoothed(values)
    finite = np.isfinite(values)
    if finite.sum() < SMOOTH:
        return []
    start = float(np.median(values[finite][:SMOOTH]))
    best = np.fmin.accumulate(np.where(np.isfinite(smooth), smooth, np.nan))
    found = None
    for severity, (given_back, factor), hold in (("error", DIVERGE_ERROR, DIVERGE_LOST),
                                                 ("warning", DIVERGE_WARNING, DIVERGE_HOLD)):
        with np.errstate(invalid="ignore"):
            line = np.where(best < start, np.maximum(best + given_back * (start - best), factor * best), factor * start)
            above = smooth > line
        held = _held(above)
        if held >= hold and np.isfinite(best[-1]):
            found = (severity, held, float(line[-1]))
            break
    if found is None:
        return []
    severity, held, line = found
    began = int(steps[len(steps) - held])
    now = smooth[-1]
    lost = "it has given back what it learned" if best[-1] < start else "it never learned"
    return [after_lr_jump(finding("divergence", severity, [], f"The loss is diverging: its running median rose to "
                                  f"{now:.3g} (best {best[-1]:.3g}, start {start:.3g}) at step {began} and has stayed "
                                  f"above {line:.3g} for {held} steps; {lost}.",
                                  {"step": began, "held": held, "loss": float(now), "best": float(best[-1]),
                                   "start": start}, ctx), trace, began)]


def loss_stall(trace: Trace, ctx: Context) -> list[Finding]:
    """The loss has not left where it began (within STALL_FRACTION of its start) and is flat over the last half of the
    run (STALL_WINDOW steps at least), past any warmup: the run is not learning."""
    loss = _loss(trace)
    if loss is None:
        return []
    steps, values = loss
    finite = np.isfinite(values)
    if not finite.all() or len(values) < STALL_WINDOW:
        return []  # a NaN is the nonfinite rule's
    window = values[-max(STALL_WINDOW, len(values) // 2):]
    part = max(len(window) // STALL_PARTS, 1)
    # where it began: the loss at step 0, or the median of the first SMOOTH steps where lower (a noisy first batch);
    # at a hot lr the loss jumps in the first steps (3.49 to 4.2 in a GPT-NeoX at lr 0.1), which a median would take
    # for the start, reading a run stuck at chance as one that learned 13%
    start = min(float(values[0]), float(np.median(values[:SMOOTH])))
    first, now = float(np.median(window[:part])), float(np.median(window[-part:]))
    if start <= 0 or abs(now - start) > (1 - STALL_FRACTION) * start or abs(first - now) >= STALL_DROP * first:
        return []  # it learned (or rose: divergence's), or it still moves
    if "lr" in trace.scalar_names:
        lr_steps, lr = trace.scalar("lr")
        inside = (lr_steps >= steps[-len(window)]) & np.isfinite(lr)
        if inside.sum() >= 2 and lr[inside][-1] > STALL_LR_RISING * lr[inside][0]:
            return []  # still warming up
    at, since = int(steps[-1]), int(steps[-len(window)])
    evidence = {"step": at, "loss": now, "start": start, "window": len(window), "change": (now - first) / first}
    moves = _update_ratio(trace, since)
    why = ""
    if moves is not None:
        evidence["update_to_weight"] = moves
        why = ("; its steps are large (update/weight of the median layer {:.1e}): too large to settle" if
               moves >= STEPS_LARGE else "; its steps are tiny (update/weight of the median layer {:.1e})" if
               moves <= STEPS_SMALL else "").format(moves)
    held = at - since + 1 >= STALL_HOLD
    plateau = "" if held else (f"; a plateau shorter than {STALL_HOLD} steps can precede a sudden drop (a "
                               "transformer's phase change), so it is a warning only if it holds")
    return [finding("loss_stall", "warning" if held else "info", [], f"The loss has not learned: {now:.3g} at step "
                    f"{at}, within {100 * (1 - STALL_FRACTION):.0f}% of where it began ({start:.3g}), and flat over "
                    f"the last {len(window)} steps ({100 * (now - first) / first:+.1f}%){why}{plateau}.", evidence,
                    ctx)]


def _update_ratio(trace: Trace, since: int) -> float | None:
    """The median over layers of each layer's median update/weight at the steps from ``since`` on, where measured."""
    if "update_to_weight" not in trace.metrics:
        return None
    values = trace.metric("update_to_weight")[trace.steps >= since]
    per_layer = []
    for column in values.T:
        column = column[np.isfinite(column) & (column > 0)]
        if column.size:
            per_layer.append(float(np.median(column)))
    return float(np.median(per_layer)) if per_layer else None


def gradient_jump(trace: Trace, ctx: Context) -> list[Finding]:
    """The total gradient norm jumps JUMP_WARNING times its rolling median or more at a measured step, and the loss is
    not falling meanwhile: a transient explosion, reported whether or not it has fallen back since. Called by the depth
    rules' ``exploding_gradients`` (one rule per kind)."""
    if "total_grad_norm" not in trace.metrics or "" not in trace.layers:
        return []
    column = trace.metric("total_grad_norm")[:, trace.layers.index("")]
    rows = np.flatnonzero(np.isfinite(column) & (column > 0))
    if rows.size <= JUMP_MIN_HISTORY:
        return []
    norms, at = column[rows], trace.steps[rows]
    loss = _loss(trace)
    worst = None
    for k in range(JUMP_MIN_HISTORY, len(norms)):
        lo = int(np.searchsorted(at, at[k] - JUMP_SPAN - JUMP_SMOOTH, "left"))
        mid = int(np.searchsorted(at, at[k] - JUMP_SMOOTH, "right"))
        if mid - lo < JUMP_MIN_HISTORY:
            continue
        before = float(np.median(norms[lo:mid]))
        ratio = float(np.median(norms[mid:k + 1]) / before)
        if ratio < JUMP_WARNING or (worst is not None and ratio <= worst[0]):
            continue
        falling = False
        if loss is not None:  # the loss over the same stretch: from the window's first measurement to this one
            s, v = loss
            then = v[(s >= at[lo] - SMOOTH) & (s <= at[lo])]
            now = v[(s > at[k] - 2 * SMOOTH) & (s <= at[k])]
            then, now = then[np.isfinite(then)], now[np.isfinite(now)]
            falling = bool(then.size and now.size and np.median(now) <= JUMP_LOSS_FALLING * np.median(then))
        worst = (ratio, k, falling, before)
    if worst is None:
        return []
    ratio, k, falling, median = worst
    back = bool(norms[-1] < JUMP_WARNING * median)
    later = norms[k + 1:]
    one_batch = bool(later.size and np.all(later <= JUMP_BACK * median) and ratio < JUMP_ONE_BATCH)
    severity = "info" if falling or one_batch else ("error" if ratio >= JUMP_ERROR else "warning")
    what = (f"The total gradient norm jumped {ratio:.0f}x its recent median at step {int(at[k])} "
            f"({norms[k]:.2e})")
    tail = ("; the loss was falling meanwhile, as when a net learns a new skill: likely benign" if falling else
            "; every later measurement is back near where it was: one hard batch" if one_batch else
            "; it has fallen back since: a transient explosion (a recurrence whose radius passed 1, a bad batch, a "
            "learning-rate jump)" if back else "; it has stayed up")
    return [finding("exploding_gradients", severity, [], what + tail + ".",
                    {"step": int(at[k]), "jump": ratio, "norm": float(norms[k]), "fell_back": back,
                     "loss_falling": falling, "one_batch": one_batch}, ctx)]


def output_logit_drift(trace: Trace, ctx: Context) -> list[Finding]:
    """log Z of the output softmax past LOG_Z_ERROR (an error), or past LOG_Z_FLOOR and forecast to pass it within
    LOG_Z_HORIZON steps (a warning)."""
    if "log_z" not in trace.metrics or "" not in trace.layers:
        return []
    column = np.abs(trace.metric("log_z")[:, trace.layers.index("")])
    rows = np.flatnonzero(np.isfinite(column))
    if rows.size == 0:
        return []
    steps, values = trace.steps[rows], column[rows]
    now, step = float(values[-1]), int(steps[-1])
    trend = forecast(steps, values, LOG_Z_ERROR)
    evidence = {"step": step, "log_z": now, "first_log_z": float(values[0])}
    if trend is not None:
        evidence.update(factor_per_100=trend.factor_per_100, steps_to_threshold=trend.steps_to_threshold)
    if now >= LOG_Z_ERROR:  # an error where the run computes in 16 bits; in float32, where it still resolves, a warning
        said = ("the softmax no longer resolves the loss in 16 bits" if ctx.low_precision else "in float32 the "
                "confident samples' loss and gradient round to zero, and in 16 bits the softmax would no longer "
                "resolve the loss")
        return [finding("output_logit_drift", "error" if ctx.low_precision else "warning", [], f"The output logits "
                        f"have drifted: log Z (logsumexp over the classes) is {now:.1f} at step {step}, from "
                        f"{values[0]:.1f}; {said}.", evidence, ctx)]
    if now < LOG_Z_FLOOR or trend is None or trend.steps_to_threshold is None or \
            trend.steps_to_threshold > LOG_Z_HORIZON:
        return []
    return [finding("output_logit_drift", "warning", [], f"The output logits drift: log Z is {now:.1f} at step {step} "
                    f"(from {values[0]:.1f}); {trend.says('log Z', LOG_Z_ERROR)}.", evidence, ctx)]


# --- remedies, ranked --------------------------------------------------------------------------------------------
# Loss spikes and divergence: a lower peak lr or a longer warmup first (Wortsman et al. 2023 fig. 1: instability
# follows the lr; Liu et al. 2020), then clipping (Pascanu et al. 2013), Adam's beta2 (Zhai et al. 2023), skip and
# rewind (PaLM). Output logits: z-loss first (PaLM, Wortsman et al. 2023 sec. 3.2), then weight decay on the head.
def rank_spike(ctx: Context) -> list[str]:
    return ["lr_warmup", "lower_learning_rate", "clip_grad_norm", "lower_beta2", "skip_and_rewind"]


def rank_divergence(ctx: Context) -> list[str]:
    ids = ["lower_learning_rate", "lr_warmup", "clip_grad_norm", "lower_beta2", "skip_and_rewind"]
    if ctx.model_kind == "transformer":
        ids.insert(2, "qk_norm")
    return ids


def rank_stall(ctx: Context) -> list[str]:
    # a run that never leaves its start: a warmup first (post-LN without one is the classic case, Xiong et al. 2020;
    # Liu et al. 2020), then the learning rate either way (the message says which way its steps point)
    return ["lr_warmup", "lower_learning_rate", "raise_learning_rate", "adaptive_optimizer"]


def rank_logits(ctx: Context) -> list[str]:
    return ["z_loss", "weight_decay_exclusions", "lower_learning_rate"]


register(Rule("loss_spike", loss_spike, rank_spike))
register(Rule("divergence", divergence, rank_divergence))
register(Rule("loss_stall", loss_stall, rank_stall, {"post": ("lr_warmup", "pre_ln")}))
register(Rule("output_logit_drift", output_logit_drift, rank_logits))
