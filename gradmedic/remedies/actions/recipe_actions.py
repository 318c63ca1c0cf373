"""Training-recipe actions: they change how the user's loop trains (clipping, learning rate, schedule), not
the model, so they fit trained and fresh weights alike; ``treat`` collects them into the Treatment."""

from __future__ import annotations

import functools

from gradmedic.remedies.actions._registry import Patient, action
from gradmedic.remedies.clip import AutoClip, clip_
from gradmedic.remedies.schedules import linear_warmup, warm_restarts

# A warmup as long as Xiong et al. (2020) found a post-LN transformer needs at lr 1e-3 is thousands of
# steps; a recipe cannot know the run's length, so it takes a short, common default the user can change.
WARMUP_STEPS = 100


def _clip(patient: Patient, make) -> str:
    if patient.treatment.clip is None:
        patient.treatment.clip = make()
    return "clip gradients before each optimizer step"


@action("clip_grad_norm", "scale", keeps_function=True)
def clip_grad_norm(patient: Patient) -> str:
    _clip(patient, lambda: functools.partial(clip_, mode="norm", max_norm=1.0))
    return "clip the global gradient norm to 1 before each step"


@action("clip_grad_value", "scale", keeps_function=True)
def clip_grad_value(patient: Patient) -> str:
    _clip(patient, lambda: functools.partial(clip_, mode="value", clip_value=1.0))
    return "clip each gradient entry to [-1, 1]"


@action("autoclip", "scale", keeps_function=True)
def autoclip(patient: Patient) -> str:
    _clip(patient, lambda: AutoClip(percentile=10))
    return "AutoClip at the 10th percentile of the gradient-norm history"


@action("agc", "scale", keeps_function=True)
def agc(patient: Patient) -> str:
    _clip(patient, lambda: functools.partial(clip_, mode="agc"))
    return "adaptive gradient clipping (AGC, lambda 0.01)"


@action("lower_learning_rate", "scale", keeps_function=True)
def lower_learning_rate(patient: Patient) -> str:
    patient.treatment.lr = min(patient.treatment.lr, 1e-4)
    return "learning rate 1e-4"


@action("lr_warm_restarts", "scale", keeps_function=True)
def lr_warm_restarts(patient: Patient) -> str:
    patient.treatment.schedule = functools.partial(warm_restarts, period=100)
    return "cosine learning rate with warm restarts every 100 steps"


@action("lr_warmup", "scale", keeps_function=True)
def lr_warmup(patient: Patient) -> str:
    patient.treatment.schedule = functools.partial(linear_warmup, steps=WARMUP_STEPS)
    return f"linear learning-rate warmup over the first {WARMUP_STEPS} steps"


@action("loss_scaling", "scale", keeps_function=True)
def loss_scaling(patient: Patient) -> str:
    patient.treatment.loss_scaling = True
    return "scale the loss (GradScaler) so float16 gradients do not flush to zero"
