"""The training-run corpus (tests/training_runs.py) does what it says: each bad run fails inside its window, each
healthy run never fails and keeps a margin below every failure threshold, and a run replays exactly."""

from __future__ import annotations

import math

import pytest
import torch

from tests import training_runs as corpus

# A healthy run's statistic stays below this share of each failure threshold (the worst seen over seeds 0-2 and the
# default and AVX2 kernels is in benchmarks/training_runs_spread.json); the early-loss ratio of the divergence line
# sits at 2/3 by construction at step DIVERGE_HOLD.
HEALTHY_MARGIN = 0.85
# The GPT runs (a few seconds each, ~15 s in float16 on a CPU) are marked slow; the rest take ~20 s together.
SLOW_MODELS = ("gpt",)


def _param(r: corpus.Run):
    marks = [pytest.mark.slow] if r.model in SLOW_MODELS else []
    return pytest.param(r, id=r.name, marks=marks)


def test_corpus_size():
    assert len(corpus.BAD) >= 10 and len(corpus.HEALTHY) >= 10
    classes = {r.klass for r in corpus.BAD}
    for needed in ("high_lr_no_warmup", "attention_logit_growth", "post_ln_no_warmup", "dying_units_hot_lr",
                   "explosive_recurrence", "fp16_no_loss_scaling", "lr_spike_no_clipping", "nan_from_data",
                   "output_logit_drift", "adam_epsilon"):
        assert needed in classes
    assert len({r.name for r in corpus.RUNS}) == len(corpus.RUNS)


@pytest.mark.parametrize("r", [_param(r) for r in corpus.BAD])
def test_bad_run_fails_in_its_window(r):
    result = corpus.run(r)
    low, high = r.window
    assert result.failure_step is not None, f"{r.name} did not fail; peaks {result.peaks}"
    assert low <= result.failure_step <= high, (r.name, result.failure_step, result.failure_by, result.fired)


@pytest.mark.parametrize("r", [_param(r) for r in corpus.HEALTHY])
def test_healthy_run_stays_healthy_with_margin(r):
    result = corpus.run(r)
    assert result.failure_step is None, (r.name, result.failure_step, result.failure_by)
    for name, peak in result.peaks.items():
        assert peak <= HEALTHY_MARGIN, (r.name, name, peak)
    assert math.isfinite(result.final_loss) and result.final_loss < 0.5 * result.losses[0]


def test_replay_is_exact_and_on_step_sees_gradients_before_the_update():
    r = corpus.by_name("nan_from_data_mlp")
    seen = []

    def on_step(step, model, optimizer, loss):
        first = next(model.parameters())
        seen.append((step, first.grad is not None, first.detach().clone()))

    a = corpus.run(r, on_step, steps=10)
    b = corpus.run(r, steps=10)
    assert a.losses == b.losses and a.grad_norms == b.grad_norms
    assert [s for s, _, _ in seen] == list(range(10)) and all(g for _, g, _ in seen)
    # the weights seen at step k are those before step k's update: step 0 sees the seeded init
    torch.manual_seed(r.seed)
    init = next(corpus.MODELS[r.model](**dict(r.model_kwargs)).parameters())
    assert torch.equal(seen[0][2], init)
