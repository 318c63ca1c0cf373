"""Rescue a run (issue 27): ``gm.treat`` on the findings of a Monitor-watched corpus run (tests/training_runs.py) judges
each remedy by re-running the run's recipe, and what it returns, replayed by the corpus's own trainer (not gradmedic's
re-run), trains past the failure: the mean loss of the last fifth of the steps at most ``RESCUED`` of the untreated
run's. A healthy run's treatment changes nothing. Runs of a few seconds each (the GPT classes are in
benchmarks/rescue.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import gradmedic as gm
from tests import rescue
from tests import training_runs as corpus

RESCUED = 0.8  # issue 27: the treated run's loss at the end is at most 0.8x the untreated run's
TAIL = 0.2  # the loss "at the end": the mean over the last fifth of the steps (a single batch's loss jumps)

BAD_RUNS = ("high_lr_no_warmup_mlp", "dying_units_hot_lr_mlp", "explosive_recurrence_rnn")
HEALTHY_RUNS = ("healthy_mlp_adam", "healthy_mlp_sgd_cosine", "healthy_rnn_adam", "healthy_cnn_adam_warmup")


def _end(losses: list[float]) -> float:
    tail = losses[-max(1, int(len(losses) * TAIL)):]
    return math.inf if not all(math.isfinite(v) for v in tail) else sum(tail) / len(tail)


def _recipe_of(r: corpus.Run, treatment: gm.Treatment) -> corpus.Recipe:
    """The corpus recipe with the treatment's recipe changes, for the corpus's own trainer."""
    rec = r.recipe
    clip = rec.clip
    if treatment.clip is not None:
        clip = min(clip or math.inf, treatment.clip.keywords["max_norm"])
    warmup = rec.warmup
    if treatment.schedule is not None:
        assert not rec.warmup, "a warmup on top of the run's own: not expressible in the corpus recipe"
        warmup = treatment.schedule.keywords["steps"]
    return dataclasses.replace(rec, lr=treatment.lr, clip=clip, warmup=warmup,
                               precision="fp16_scaler" if treatment.loss_scaling else rec.precision)


@pytest.mark.parametrize("name", BAD_RUNS)
def test_treat_on_a_runs_findings_returns_a_remedy_that_trains_past_the_failure(name):
    r = corpus.by_name(name)
    untreated, report = rescue.watched(r)
    assert untreated.failure_step is not None and not report.healthy
    treatment = gm.treat(rescue.step0(r), report, **rescue.treat_args(r))
    assert treatment.applied or treatment.recipe, str(treatment)
    assert treatment.evidence[0].stage == "untreated" and any(e.kept for e in treatment.evidence[1:])
    # the loss alone (the dead-unit detector reads the untreated architecture)
    treated = corpus.run(dataclasses.replace(r, recipe=_recipe_of(r, treatment), detectors=corpus.ALWAYS),
                         model=treatment.model)
    assert _end(treated.losses) <= RESCUED * _end(untreated.losses), (str(treatment), _end(treated.losses),
                                                                       _end(untreated.losses))
    # the run's re-run inside treat agrees with the corpus's trainer on the kept stage (same recipe, same batches)
    kept = [e for e in treatment.evidence if e.kept][-1]
    assert kept.score == pytest.approx(_end(treated.losses), rel=0.05)


@pytest.mark.parametrize("name", HEALTHY_RUNS)
def test_a_healthy_runs_treatment_changes_nothing(name):
    r = corpus.by_name(name)
    _, report = rescue.watched(r)
    assert report.healthy
    model = rescue.step0(r)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    treatment = gm.treat(model, report, **rescue.treat_args(r))
    assert not treatment.applied and not treatment.recipe
    after = treatment.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_runs_finding_without_the_run_is_not_judged_at_init():
    """The bug of issue 27: a re-check at init passes any change for a finding from training. Without the run's
    data and optimizer, nothing is done to the model and treat says why."""
    r = corpus.by_name("dying_units_hot_lr_mlp")
    _, report = rescue.watched(r)
    x, _ = rescue.batches(r)[0]
    treatment = gm.treat(rescue.step0(r), report, inputs=x)
    assert not treatment.applied and any("re-running the run" in why for _, why in treatment.skipped)
