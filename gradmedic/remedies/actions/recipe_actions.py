"""Training-recipe actions: they change how the user's loop trains (clipping, learning rate, schedule, the
optimizer's epsilon, beta2 and weight decay, the loss, the precision), not the model, so they fit trained and fresh
weights alike; ``treat`` collects them into the Treatment. Each records the values it chose
(``Treatment.note``), which ``Treatment.howto()`` renders in the user's terms; one that cannot apply to the recipe
(an epsilon for an optimizer without one) raises ``GradmedicError``."""

from __future__ import annotations

import functools
import inspect

import torch

from gradmedic._errors import GradmedicError
from gradmedic.remedies.actions._registry import Patient, action
from gradmedic.remedies.clip import AutoClip, clip_
from gradmedic.remedies.groups import WEIGHT_DECAY
from gradmedic.remedies.schedules import linear_warmup, warm_restarts
from gradmedic.remedies.zloss import Z_LOSS_COEF

# Ma & Yarats 2021 ("On the adequacy of untuned warmup for adaptive optimization", AAAI): a linear warmup over
# 2 / (1 - beta2) steps (2,000 at Adam's 0.999) matches tuned warmups, because Adam's second-moment estimate has
# about that many steps of history by then; for an optimizer without beta2 there is no such clock, and a recipe takes
# a short, common default the user can change.
WARMUP_BETA2_STEPS = 2.0
WARMUP_STEPS = 100
# a lower learning rate is one decade below the run's (the grid of an lr sweep; Wortsman et al. 2023 fig. 1 show
# the instabilities of small transformers setting in within about a decade above the best rate)
LOWER_FACTOR = 10.0
# Wortsman et al. 2023 sec. 3.4: eps 1e-15 instead of 1e-8 keeps Adam's normalised step for layers whose gradient
# RMS has fallen near 1e-8 (their fig. 11); float32 holds it (an optimizer state in float16 would flush it to 0)
ADAM_EPSILON = 1e-15
# Zhai et al. 2023 / Wortsman et al. 2023 / the LLM recipes (GPT-3, Llama, OLMo): beta2 0.95 instead of 0.999
BETA2 = 0.95
# updates far below 1e-3 of the weights (stalled): ten times the learning rate is one decade toward it
RAISE_FACTOR = 10.0
# adaptive_optimizer is advice, not an action (``howto`` renders it): on an optimizer that is adaptive already it
# has nothing to do, and treat's recipe for a finding at init applies the first recipe action without a fallback


def _clip(patient: Patient, rid: str, make, **values) -> str:
    if patient.treatment.clip is None:
        patient.treatment.clip = make()
        patient.treatment.note(rid, **values)
    return "clip gradients before each optimizer step"


@action("clip_grad_norm", "scale", keeps_function=True)
def clip_grad_norm(patient: Patient) -> str:
    _clip(patient, "clip_grad_norm", lambda: functools.partial(clip_, mode="norm", max_norm=1.0), max_norm=1.0)
    return "clip the global gradient norm to 1 before each step"


@action("clip_grad_value", "scale", keeps_function=True)
def clip_grad_value(patient: Patient) -> str:
    _clip(patient, "clip_grad_value", lambda: functools.partial(clip_, mode="value", clip_value=1.0), clip_value=1.0)
    return "clip each gradient entry to [-1, 1]"


@action("autoclip", "scale", keeps_function=True)
def autoclip(patient: Patient) -> str:
    _clip(patient, "autoclip", lambda: AutoClip(percentile=10), percentile=10)
    return "AutoClip at the 10th percentile of the gradient-norm history"


@action("agc", "scale", keeps_function=True)
def agc(patient: Patient) -> str:
    _clip(patient, "agc", lambda: functools.partial(clip_, mode="agc"), clip_factor=0.01)
    return "adaptive gradient clipping (AGC, lambda 0.01)"


@action("lower_learning_rate", "scale", keeps_function=True)
def lower_learning_rate(patient: Patient) -> str:
    treatment = patient.treatment
    before = treatment.lr
    treatment.lr = before / LOWER_FACTOR
    treatment.note("lower_learning_rate", lr=treatment.lr)
    return f"learning rate {before:g} -> {treatment.lr:g}"


@action("lr_warm_restarts", "scale", keeps_function=True)
def lr_warm_restarts(patient: Patient) -> str:
    patient.treatment.schedule = functools.partial(warm_restarts, period=100)
    patient.treatment.note("lr_warm_restarts", period=100)
    return "cosine learning rate with warm restarts every 100 steps"


@action("lr_warmup", "scale", keeps_function=True)
def lr_warmup(patient: Patient) -> str:
    treatment = patient.treatment
    steps = warmup_steps(treatment)
    treatment.schedule = functools.partial(linear_warmup, steps=steps)
    treatment.note("lr_warmup", steps=steps)
    return f"linear learning-rate warmup over the first {steps} steps"


def warmup_steps(treatment) -> int:
    """2 / (1 - beta2) steps for an optimizer with a beta2 (the recipe's, else the optimizer's), else
    ``WARMUP_STEPS``. Not cut to the re-run's length: a re-run replays the first steps of the user's run, which a
    warmup of the user's run would hold at those steps' fraction of the learning rate."""
    declared = inspect.signature(treatment.optimizer_class).parameters.get("betas")
    default = declared.default if declared is not None and declared.default is not inspect.Parameter.empty else None
    betas = treatment.optimizer_defaults.get("betas") or default
    beta2 = treatment.beta2 if treatment.beta2 is not None else (float(betas[1]) if betas else None)
    steps = round(WARMUP_BETA2_STEPS / (1.0 - beta2)) if beta2 is not None and beta2 < 1 else WARMUP_STEPS
    return max(1, steps)


@action("loss_scaling", "scale", keeps_function=True)
def loss_scaling(patient: Patient) -> str:
    patient.treatment.loss_scaling = True
    return "scale the loss (GradScaler) so float16 gradients do not flush to zero"


def _takes(patient: Patient, name: str) -> bool:
    return name in inspect.signature(patient.treatment.optimizer_class).parameters


@action("lower_adam_epsilon", "scale", keeps_function=True)
def lower_adam_epsilon(patient: Patient) -> str:
    treatment = patient.treatment
    if not _takes(patient, "eps"):
        raise GradmedicError(f"{treatment.optimizer_class.__name__} has no eps")
    now = treatment.eps if treatment.eps is not None else treatment.optimizer_defaults.get("eps", 1e-8)
    if now <= ADAM_EPSILON:
        raise GradmedicError(f"eps is {now:g} already")
    treatment.eps = ADAM_EPSILON
    treatment.note("lower_adam_epsilon", eps=ADAM_EPSILON)
    return f"Adam's eps {now:g} -> {ADAM_EPSILON:g}"


@action("lower_beta2", "scale", keeps_function=True)
def lower_beta2(patient: Patient) -> str:
    treatment = patient.treatment
    if not _takes(patient, "betas"):
        raise GradmedicError(f"{treatment.optimizer_class.__name__} has no betas")
    betas = tuple(treatment.optimizer_defaults.get("betas") or (0.9, 0.999))
    now = treatment.beta2 if treatment.beta2 is not None else betas[1]
    if now <= BETA2:
        raise GradmedicError(f"beta2 is {now:g} already")
    treatment.beta2 = BETA2
    treatment.note("lower_beta2", beta2=BETA2, beta1=float(betas[0]))
    return f"Adam's beta2 {now:g} -> {BETA2:g}"


@action("weight_decay_exclusions", "scale", keeps_function=True)
def weight_decay_exclusions(patient: Patient) -> str:
    treatment = patient.treatment
    switched = ""
    if treatment.optimizer_class is torch.optim.Adam:  # Adam's weight_decay is L2 in the gradient, not decoupled
        treatment.optimizer_class = torch.optim.AdamW
        accepted = inspect.signature(torch.optim.AdamW).parameters  # Adam's decoupled_weight_decay is AdamW's own
        treatment.optimizer_defaults = {k: v for k, v in treatment.optimizer_defaults.items()
                                        if k in accepted and k != "weight_decay"}
        switched = "AdamW in place of Adam; "
    if not _takes(patient, "weight_decay"):
        raise GradmedicError(f"{treatment.optimizer_class.__name__} has no weight_decay")
    given = treatment.weight_decay if treatment.weight_decay is not None else \
        treatment.optimizer_defaults.get("weight_decay", 0.0)
    treatment.weight_decay = float(given) if given else WEIGHT_DECAY
    treatment.decay_exclusions = True
    treatment.note("weight_decay_exclusions", weight_decay=treatment.weight_decay)
    return (f"{switched}weight decay {treatment.weight_decay:g} on the weight matrices and the head, none on biases, "
            "norms and embeddings")


@action("z_loss", "scale", keeps_function=True)
def z_loss(patient: Patient) -> str:
    patient.treatment.z_loss = Z_LOSS_COEF
    patient.treatment.note("z_loss", coef=Z_LOSS_COEF)
    return f"z-loss {Z_LOSS_COEF:g} * logsumexp(logits)^2 added to the loss"


@action("raise_learning_rate", "scale", keeps_function=True)
def raise_learning_rate(patient: Patient) -> str:
    treatment = patient.treatment
    before = treatment.lr
    treatment.lr = before * RAISE_FACTOR
    treatment.note("raise_learning_rate", lr=treatment.lr)
    return f"learning rate {before:g} -> {treatment.lr:g}"


@action("higher_precision", "scale", keeps_function=True)
def higher_precision(patient: Patient) -> str:
    patient.treatment.precision = "bfloat16"
    patient.treatment.loss_scaling = False
    patient.treatment.note("higher_precision", precision="bfloat16")
    return "bfloat16 autocast in place of float16 (float32's range: no overflow, no loss scale needed)"
