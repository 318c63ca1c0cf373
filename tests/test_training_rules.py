"""The rules of issue 26's training signals, table-driven on synthetic traces (bad, healthy and benign trends), and a
diagnosis mid-run equal to the end's cut at that step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.rules import optimizer as opt_rules
from gradmedic.diagnosis.rules import training
from gradmedic.probes.base import Chunk

RNG = np.random.default_rng(0)


def _trace(loss=None, grid=None, scalars=None, steps=None) -> gm.Trace:
    """A trace with a loss at every step and per-layer metrics ``grid`` = {metric: {layer: values at ``steps``}}."""
    trace = gm.Trace({"modules": ["", "fc1", "fc2"], "types": {"": "Sequential", "fc1": "Linear", "fc2": "Linear"},
                      "params": {"fc1": 10, "fc2": 10}})
    extra = dict(scalars or {})
    if loss is not None:
        extra["loss"] = (np.arange(len(loss)), np.asarray(loss, dtype=float))
    if extra:
        trace.extend(Chunk(np.zeros(0, np.int64), [], [], np.zeros((0, 0, 0)), scalars=extra))
    if grid:
        metrics = list(grid)
        layers = sorted({k for per in grid.values() for k in per}, key=["", "fc1", "fc2"].index)
        values = np.full((len(steps), len(layers), len(metrics)), np.nan)
        for m, per in grid.items():
            for layer, v in per.items():
                values[:, layers.index(layer), metrics.index(m)] = v
        trace.extend(Chunk(np.asarray(steps, dtype=np.int64), layers, metrics, values))
    return trace


def _kinds(findings) -> list[tuple[str, str]]:
    return [(f.kind, f.severity) for f in findings]


def _noisy(level, n, sd=0.02):
    return level * (1 + sd * RNG.standard_normal(n))


LEARNING = np.concatenate([np.linspace(2.3, 0.5, 100), _noisy(0.5, 100)])

# --- loss spikes ---------------------------------------------------------------------------------------------------
RECOVERED = LEARNING.copy()
RECOVERED[150] = 5.0  # one bad batch
HELD = LEARNING.copy()
HELD[150:] = _noisy(4.0, 50)  # a spike that stays
LAST = LEARNING[:151].copy()
LAST[150] = 5.0  # at the last step seen: not yet told from one that stays


@pytest.mark.parametrize("loss, want", [
    (LEARNING, []),
    (RECOVERED, [("loss_spike", "info")]),
    (HELD, [("loss_spike", "warning")]),
    (LAST, [("loss_spike", "info")]),
    (np.ones(60), []),  # a constant loss: no standard deviation, no spike
], ids=["healthy", "recovered", "held", "at_last_step", "constant"])
def test_loss_spike(loss, want):
    assert _kinds(training.loss_spike(_trace(loss), Context())) == want


def test_loss_spike_is_seven_sigma_from_the_rolling_mean():
    base = _noisy(1.0, 80, sd=0.03)  # 7 sd: a rise of ~21%, above the 10% floor
    window = base[70 - training.SPIKE_WINDOW:70]
    for sigmas, found in ((6.5, False), (7.5, True)):
        loss = base.copy()
        loss[70:] = window.mean() + sigmas * window.std()  # and held
        assert bool(training.loss_spike(_trace(loss), Context())) == found


def test_a_nearly_constant_loss_needs_a_rise_of_a_tenth_too():
    assert training.SPIKE_MIN_RISE == 0.1
    base = _noisy(2.3, 80, sd=0.0005)  # a loss stuck near chance: 7 sd is 0.35%
    window = base[70 - training.SPIKE_WINDOW:70]
    for rise, found in ((0.02, False), (0.08, False), (0.12, True)):  # every one of them > 20 sd
        loss = base.copy()
        loss[70:] = window.mean() * (1 + rise)
        assert (loss[70] - window.mean()) / window.std() > 20
        assert bool(training.loss_spike(_trace(loss), Context())) == found


# --- a loss that never learns -------------------------------------------------------------------------------------
STUCK = np.concatenate([np.linspace(2.9, 2.65, 20), _noisy(2.65, 100, sd=0.005)])  # post-LN at chance: -9%, then flat
SLOW = np.linspace(2.9, 2.55, 120) * (1 + 0.01 * RNG.standard_normal(120))  # -12% over the run: slow, but learning
LEVELLED = np.concatenate([np.linspace(2.3, 1.9, 60), _noisy(1.9, 100, sd=0.01)])  # learned 17%, then flat


@pytest.mark.parametrize("loss, want", [
    (STUCK, [("loss_stall", "info")]),  # flat over 60 steps: a plateau so far (STALL_HOLD)
    (np.concatenate([STUCK, _noisy(2.65, 120, sd=0.005)]), [("loss_stall", "warning")]),  # flat over 120: held
    (np.concatenate([[2.3, 2.8, 3.0, 3.0, 2.9], _noisy(2.25, 200, sd=0.005)]), [("loss_stall", "warning")]),  # hot
    (STUCK[:45], []),  # fewer than STALL_WINDOW steps: not judged
    (_noisy(2.3, 200, sd=0.02), [("loss_stall", "warning")]),  # never moved
    (SLOW, []),
    (LEVELLED, []),  # converged (or at its floor) below 90% of its start: not a stall
    (LEARNING, []),
    (np.concatenate([_noisy(2.3, 20), _noisy(2.8, 80, sd=0.005)]), []),  # 22% above its start: divergence's
], ids=["stuck", "stuck_held", "jumped_then_stuck", "too_short", "never_moved", "slow", "levelled", "learning", "rose"])
def test_loss_stall(loss, want):
    assert _kinds(training.loss_stall(_trace(loss), Context())) == want


def test_a_flat_loss_while_the_lr_warms_up_is_no_stall_and_after_it_is():
    n = 160
    lr = np.minimum(np.arange(n) + 1, 100) / 100 * 1e-3  # linear warmup over 100 steps
    scalars = {"lr": (np.arange(n), lr)}
    flat = _noisy(2.3, n, sd=0.005)
    assert training.loss_stall(_trace(flat[:90], scalars={"lr": (np.arange(90), lr[:90])}), Context()) == []
    (f,) = training.loss_stall(_trace(flat, scalars=scalars), Context())  # 60 steps at the peak lr: flat
    assert f.evidence["window"] == 80 and abs(f.evidence["change"]) < training.STALL_DROP


def test_a_stall_says_whether_its_steps_are_large_or_tiny_by_hand():
    steps = np.arange(0, 120, 20)
    for ratio, says in ((0.2, "large"), (1e-7, "tiny"), (1e-3, None)):
        grid = {"update_to_weight": {"fc1": np.full(len(steps), ratio), "fc2": np.full(len(steps), ratio)}}
        (f,) = training.loss_stall(_trace(STUCK, grid, steps=steps), Context())
        assert f.evidence["update_to_weight"] == pytest.approx(ratio)
        assert (says is None and "steps are" not in f.message) or f"steps are {says}" in f.message


def test_loss_stall_ranks_a_warmup_first_and_pre_ln_on_a_post_ln_transformer():
    from gradmedic.diagnosis import prescribe
    assert prescribe("loss_stall", {})[0] == "lr_warmup"
    assert prescribe("loss_stall", {"model_kind": "transformer", "norm_placement": "post"})[:2] == ["lr_warmup",
                                                                                                    "pre_ln"]


def test_corpus_post_ln_run_that_never_learns_is_a_loss_stall_before_its_failure_step():
    corpus = pytest.importorskip("tests.training_runs")
    result, trace = corpus.watched("post_ln_no_warmup_gpt")
    first = next(cut for cut in range(9, len(result.losses), 10)
                 if any(f.kind == "loss_stall" for f in gm.diagnose(trace.until(cut)).findings))
    assert first < result.failure_step == corpus.STALL_STEPS


# --- divergence ----------------------------------------------------------------------------------------------------
def _diverging(held):
    return np.concatenate([LEARNING[:150], _noisy(2.0, held)])  # gives back (2.0 - 0.5) / (2.3 - 0.5) = 83%


@pytest.mark.parametrize("loss, want", [
    (LEARNING, []),
    (RECOVERED, []),  # one batch does not move the running median
    (np.concatenate([LEARNING, _noisy(0.6, 50)]), []),  # a small rise (a lr restart): within 25% given back
    (_diverging(2), []),  # the median of 5 has not moved yet
    (_diverging(6), [("divergence", "warning")]),
    (_diverging(20), [("divergence", "error")]),
    (np.concatenate([_noisy(2.3, 10), _noisy(4.0, 20)]), [("divergence", "error")]),  # never learned, rising
], ids=["healthy", "one_spike", "small_rise", "starting", "warning", "lost", "never_learned"])
def test_divergence(loss, want):
    assert _kinds(training.divergence(_trace(loss), Context())) == want


def test_a_nan_loss_kept_in_the_trace_counts_as_above_every_line():
    # the Monitor keeps a NaN loss (issue 26, item 1): divergence reads it as +inf, the spike rule skips it
    loss = np.concatenate([LEARNING[:150], np.full(12, np.nan)])
    assert _kinds(training.divergence(_trace(loss), Context())) == [("divergence", "error")]
    assert _kinds(training.loss_spike(_trace(loss), Context())) == []


# --- jumps of the total gradient norm (exploding_gradients) --------------------------------------------------------
STEPS = np.arange(0, 400, 20)


def _norms(values):
    return {"total_grad_norm": {"": np.asarray(values, dtype=float)}}


FLAT = _noisy(1.0, len(STEPS), sd=0.1)
JUMP = FLAT.copy()
JUMP[8:] *= 6.0
JUMP[8] = 20.0  # a recurrence passes radius 1: x20, then falls back to 6x where it was
ONE_BATCH = FLAT.copy()
ONE_BATCH[8] = 20.0  # one hard batch: every later measurement back where it was
LATE_RISE = np.concatenate([FLAT[:10], FLAT[10:] * 1.15 ** np.arange(10)])  # Defazio 2025: a slow rise late in a run


@pytest.mark.parametrize("norms, loss, want", [
    (FLAT, np.full(400, 1.0), []),
    (JUMP, np.full(400, 1.0), [("exploding_gradients", "warning")]),
    (JUMP, np.linspace(2.0, 0.2, 400), [("exploding_gradients", "info")]),  # the loss falls meanwhile: learning
    (JUMP * np.where(np.arange(len(STEPS)) == 8, 100, 1), np.full(400, 1.0), [("exploding_gradients", "error")]),
    (ONE_BATCH, np.full(400, 1.0), [("exploding_gradients", "info")]),
    (ONE_BATCH * np.where(np.arange(len(STEPS)) == 8, 30, 1), np.full(400, 1.0), [("exploding_gradients", "warning")]),
    (ONE_BATCH[:9], np.full(161, 1.0), [("exploding_gradients", "warning")]),  # at the last measurement: not yet known
    (LATE_RISE, np.linspace(2.0, 0.2, 400), []),
    (FLAT[::-1] * np.linspace(3, 0.3, len(STEPS)), np.linspace(2.0, 0.2, 400), []),  # falls as the loss falls
], ids=["flat", "jump", "jump_while_learning", "jump_2000x", "one_batch", "one_batch_600x", "one_batch_last",
        "late_rise_weight_decay", "falling"])
def test_gradient_jump(norms, loss, want):
    trace = _trace(loss, _norms(norms), steps=STEPS[:len(norms)])
    assert _kinds(training.gradient_jump(trace, Context())) == want


def test_at_every_step_single_hard_batches_are_no_jump_and_a_held_one_is():
    steps = np.arange(400)
    norms = _noisy(1.0, 400, sd=0.1)
    norms[::37] *= 25.0  # single batches near zero loss: 25x, one step each
    loss = np.full(400, 0.01)
    assert _kinds(training.gradient_jump(_trace(loss, _norms(norms), steps=steps), Context())) == []
    norms[300:] *= 6.0  # a recurrence passes radius 1: the norm stays up
    found = training.gradient_jump(_trace(loss, _norms(norms), steps=steps), Context())
    assert _kinds(found) == [("exploding_gradients", "warning")] and 300 <= found[0].evidence["step"] < 300 + 3 * 20


def test_a_jump_that_fell_back_is_reported_in_the_exploding_gradients_rule():
    norms = FLAT.copy()
    norms[8:10] = (20.0, 8.0)  # two measurements up, then back: not one batch, and nothing left at the end
    report = gm.diagnose(_trace(np.full(400, 1.0), _norms(norms), steps=STEPS))
    found = report.of_kind("exploding_gradients")
    assert [f.severity for f in found] == ["warning"]
    assert found[0].evidence["fell_back"] and found[0].evidence["jump"] > 10 and found[0].evidence["step"] == 160
    assert found[0].remedies[0] == "clip_grad_norm"


# --- output logits -------------------------------------------------------------------------------------------------
def _log_z(values):
    return {"log_z": {"": np.asarray(values, dtype=float)}}


@pytest.mark.parametrize("values, want", [
    (np.concatenate([np.linspace(2.3, 15, 6), _noisy(15, 14)]), []),  # a classifier grows confident, levels off
    (np.concatenate([np.linspace(2.3, 19, 10), 19 * 1.04 ** np.arange(1, 11)]), [("output_logit_drift", "warning")]),
    (np.linspace(2.3, 35, 20), [("output_logit_drift", "warning")]),  # past 30 in float32: a warning
    (-np.linspace(2.3, 35, 20), [("output_logit_drift", "warning")]),  # drifting negative: |log Z|
], ids=["levels_off", "drifting", "past", "negative"])
def test_output_logit_drift(values, want):
    found = training.output_logit_drift(_trace(None, _log_z(values), steps=STEPS), Context())
    assert _kinds(found) == want
    if want and want[0][1] == "warning" and abs(values[-1]) < training.LOG_Z_ERROR:
        assert "per 100 steps" in found[0].message and found[0].remedies[0] == "z_loss"


def test_output_logits_past_the_error_line_are_an_error_in_16_bits_and_a_warning_in_float32():
    trace = _trace(None, _log_z(np.linspace(2.3, 35, 20)), steps=STEPS)
    (fp32,) = training.output_logit_drift(trace, Context())
    (half,) = training.output_logit_drift(trace, Context(low_precision=True))
    assert (fp32.severity, half.severity) == ("warning", "error")
    assert "in 16 bits" in half.message and "in float32" in fp32.message


# --- Adam's epsilon, update size, loss scale -----------------------------------------------------------------------
def _adam(margins, shares):
    return {"adam_rms_to_eps": {"fc1": np.asarray(margins, float), "fc2": np.full(len(margins), 1e4)},
            "adam_eps_share": {"fc1": np.asarray(shares, float), "fc2": np.zeros(len(margins))}}


@pytest.mark.parametrize("margins, shares, want, layers", [
    (np.full(20, 3e4), np.zeros(20), [], []),
    (np.geomspace(300, 5, 20), np.full(20, 0.05), [("adam_epsilon", "warning")], ["fc1"]),
    (np.geomspace(30, 0.5, 20), np.full(20, 0.6), [("adam_epsilon", "error")], ["fc1"]),
    (np.full(20, 1e3), np.full(20, 0.3), [("adam_epsilon", "warning")], ["fc1"]),  # a quarter of entries below eps
], ids=["healthy", "shrinking", "collapsed", "share"])
def test_adam_epsilon(margins, shares, want, layers):
    found = opt_rules.adam_epsilon(_trace(None, _adam(margins, shares), steps=STEPS), Context())
    assert _kinds(found) == want and [f.layers for f in found] == ([layers] if want else [])
    if want:
        assert found[0].remedies[0] == "lower_adam_epsilon"


@pytest.mark.parametrize("last, want", [
    (1e-3, []), (0.05, []), (0.2, [("update_too_large", "warning")]), (3.0, [("update_too_large", "error")]),
])
def test_update_too_large(last, want):
    values = np.full(len(STEPS), 1e-3)
    values[-1] = last
    grid = {"update_to_weight": {"fc1": values, "fc2": np.full(len(STEPS), 1e-3)}}
    found = opt_rules.update_too_large(_trace(None, grid, steps=STEPS), Context())
    assert _kinds(found) == want


def test_update_ratios_of_the_first_steps_are_a_transient():
    steps = np.arange(6)
    grid = {"update_to_weight": {"fc1": np.full(6, 0.3), "fc2": np.full(6, 1e-3)}}  # Adam's first steps: +-lr each
    assert opt_rules.update_too_large(_trace(None, grid, steps=steps), Context()) == []


def _scale(values):
    return {"loss_scale": (np.arange(len(values)), np.asarray(values, dtype=float))}


STARTUP = np.concatenate([2.0 ** np.arange(16, 11, -1), np.full(95, 2.0 ** 12)])  # finds its level in 5 steps
CASCADE = np.concatenate([STARTUP, 2.0 ** (12 - np.arange(1, 5))])  # then every step overflows
BELOW_ONE = np.concatenate([STARTUP, 2.0 ** (12 - np.arange(1, 15))])


@pytest.mark.parametrize("values, want", [
    (np.full(100, 2.0 ** 16), []),
    (STARTUP, []),
    (np.concatenate([STARTUP, [2.0 ** 11], np.full(50, 2.0 ** 11)]), []),  # one skipped step: ordinary
    (CASCADE, [("loss_scale_collapse", "warning")]),
    (BELOW_ONE, [("loss_scale_collapse", "error")]),
], ids=["constant", "startup", "one_skip", "cascade", "below_one"])
def test_loss_scale_collapse(values, want):
    found = opt_rules.loss_scale_collapse(_trace(None, scalars=_scale(values)), Context())
    assert _kinds(found) == want


def test_a_collapsed_loss_scale_stays_beside_the_nan_it_came_with():
    trace = _trace(None, scalars=_scale(BELOW_ONE))
    trace.extend(Chunk(np.zeros(0, np.int64), [], [], np.zeros((0, 0, 0)), events=[
        {"kind": "nonfinite", "step": 110, "module": "fc1", "phase": "forward", "value": "inf"}]))
    assert {f.kind for f in gm.diagnose(trace).findings} == {"nonfinite", "loss_scale_collapse"}


# --- mid-run equals the end cut there --------------------------------------------------------------------------------
def test_diagnosis_mid_run_equals_the_end_cut_at_that_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = gm.Monitor(model, optimizer, preset="full", flush_every=7)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 8, generator=gen), torch.randint(0, 4, (256,), generator=gen)
    mid = {}
    for step in range(90):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 if step < 40 else 3.0  # a restart gone wrong: spikes, jumps, large updates
        idx = torch.randint(0, 256, (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        mon.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step in (30, 45, 60):
            mid[step] = gm.diagnose(mon.trace).to_dict()["findings"]
    end = mon.trace
    mon.close()
    assert any(f["kind"] in ("divergence", "loss_spike", "update_too_large") for f in mid[60])
    for step, findings in mid.items():
        assert gm.diagnose(end.until(step)).to_dict()["findings"] == findings, step


# --- a NaN that comes at once --------------------------------------------------------------------------------------
def _nan_after(loss_before) -> list:
    from gradmedic.diagnosis.rules import precision

    loss = np.concatenate([loss_before, [np.nan] * 5])
    return precision.nonfinite(_trace(loss), Context())


def test_a_nan_after_a_steady_loss_is_sudden_and_leads_with_skipping_the_batch():
    from gradmedic.diagnosis.rules import precision

    (f,) = _nan_after(LEARNING[:60])  # a loss falling steadily, then NaN at once (the corpus's inf from the data)
    assert f.evidence["sudden"] is True and f.remedies[0] == "skip_and_rewind"
    assert f.remedies == precision.SUDDEN_REMEDIES and "came at once" in f.message
    assert "lower_learning_rate" not in f.remedies  # a lower lr does not mend a bad batch


def test_a_nan_after_the_loss_rose_keeps_the_ranking_of_a_run_driven_up():
    from gradmedic.diagnosis.rules import precision

    rising = np.concatenate([LEARNING[:40], np.linspace(LEARNING[39], 4 * LEARNING[39], 20)])  # x4 before the NaN
    (f,) = _nan_after(rising)
    assert "sudden" not in f.evidence and f.remedies == precision.rank_nonfinite(Context())
    (f,) = _nan_after(LEARNING[:precision.SUDDEN_HISTORY - 1])  # too few losses before it to tell
    assert "sudden" not in f.evidence


# --- a loss that goes bad after the lr jumped ---------------------------------------------------------------------
def _spiking(lr):
    loss = np.concatenate([LEARNING[:160], np.full(10, 5.0)])  # a spike at 160 that holds
    return _trace(loss, scalars={"lr": (np.arange(len(loss)), lr[:len(loss)])})


def test_a_spike_after_the_lr_jumped_says_so_and_leads_with_lowering_it():
    from gradmedic.diagnosis.rules import _schedule

    lr = np.where(np.arange(170) >= 150, 30e-3, 1e-3)  # x30 at step 150 (a schedule gone wrong)
    for rule in (training.loss_spike, training.divergence):
        (f,) = rule(_spiking(lr), Context())
        assert f.evidence["lr_jump"] == pytest.approx(30.0) and f.evidence["lr_jump_step"] == 150
        assert "rose x30 at step 150" in f.message
        assert f.remedies[0] == "lower_learning_rate" and "lr_warmup" not in f.remedies
    warmup = np.minimum(np.arange(170) + 1, 100) / 100 * 1e-3  # a linear warmup: doubles in 5 steps only before 10
    (f,) = training.loss_spike(_spiking(warmup), Context())
    assert "lr_jump" not in f.evidence and f.remedies == training.rank_spike(Context())
    early = np.where(np.arange(170) >= 100, 30e-3, 1e-3)  # a jump 60 steps before the spike: too long before
    assert "lr_jump" not in training.loss_spike(_spiking(early), Context())[0].evidence
    assert _schedule.LR_JUMP_BEFORE < 60
