"""Rescue a run with the training-time remedies (issue 27, item 2): ``gm.treat`` on the findings of a
Monitor-watched corpus run keeps the recipe remedy whose re-run ends lowest (Adam's epsilon for
``adam_epsilon_mlp``; the z-loss, weight decay off biases and norms, or a tenth of the lr for
``output_logit_drift_mlp``), and the treatment's optimizer and loss, trained by the corpus's own trainer
(tests/training_runs.py, not gradmedic's re-run) on the same batches, do not fail and end at most ``RESCUED`` of
the untreated run's loss (the run's own loss, without a z-loss). The GPT of attention-logit growth (QK-norm kept,
loss 6e-5 against 0.87) takes minutes and is measured in the CHANGELOG, not here; tests/test_qk_norm.py trains it
after ``qk_norm_``."""

from __future__ import annotations

import pytest

import gradmedic as gm
from tests import rescue
from tests import training_runs as corpus

# the remedy the re-run may keep, and what the user is told for it (a TrainingArguments field, or the loss line)
SAID = {"lower_adam_epsilon": "adam_epsilon", "weight_decay_exclusions": "weight_decay", "z_loss": "z_loss(logits",
        "lower_learning_rate": "learning_rate"}


@pytest.mark.parametrize("name,remedies", [("adam_epsilon_mlp", ("lower_adam_epsilon",)),
                                           ("output_logit_drift_mlp", ("z_loss", "weight_decay_exclusions",
                                                                                "lower_learning_rate"))])
def test_a_training_remedy_proven_by_the_rerun_trains_past_the_failure(name, remedies, one_thread):
    r = corpus.by_name(name)
    untreated, report = rescue.watched(r)
    assert untreated.failure_step is not None and not report.healthy
    treatment = gm.treat(rescue.step0(r), report, **rescue.treat_args(r))
    assert len(treatment.recipe) == 1 and treatment.recipe[0] in remedies and not treatment.applied, str(treatment)
    remedy = treatment.recipe[0]
    treated = rescue.replayed(r, treatment)  # the corpus's trainer with the treatment's optimizer and loss
    assert treated.failure_step is None, treated.fired
    ends = rescue.end(treated.losses), rescue.end(untreated.losses)
    assert ends[0] <= rescue.RESCUED * ends[1], ends
    kept = [e for e in treatment.evidence if e.kept][-1]
    assert kept.stage == remedy and kept.score == pytest.approx(rescue.end(treated.losses), rel=0.05)
    # and it is said in the user's terms
    how = treatment.howto()
    assert SAID[remedy] in how.hf_fields or SAID[remedy] in how.torch, str(how)
