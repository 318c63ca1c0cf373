"""The training-recipe remedies for what goes wrong in training: Adam's epsilon and beta2, weight decay off biases,
norms and embeddings (``decay_groups``), the z-loss, a higher or lower learning rate, an adaptive optimizer, bfloat16;
each as a treat action that sets the Treatment's recipe, and ``Treatment.optimizer()``/``loss_fn()`` honouring it.
Every remedy the training-watch rules prescribe is an action or rendered advice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmedic import GradmedicError
from gradmedic.diagnosis import REMEDIES, prescribe
from gradmedic.remedies import Treatment, ZLoss, decay_groups, howto
from gradmedic.remedies.actions import ACTIONS, Patient
from gradmedic.remedies.actions.recipe_actions import WARMUP_STEPS, warmup_steps
from gradmedic.remedies.treatment import RECIPE_FIELDS
from tests import training_runs as corpus

TRAINING_KINDS = ("attention_logit_growth", "loss_spike", "divergence", "output_logit_drift", "adam_epsilon",
                  "update_too_large", "loss_scale_collapse", "nonfinite")
ADVICE_ONLY = {"skip_and_rewind", "loss_scale_floor", "numerical_guard", "gradcheck", "accumulate",
               "adaptive_optimizer"}


def treatment(optimizer: type = torch.optim.Adam, **defaults) -> Treatment:
    torch.manual_seed(0)
    return Treatment(model=corpus.GPT(), optimizer_class=optimizer, optimizer_defaults=defaults)


def apply(t: Treatment, rid: str) -> str:
    return ACTIONS[rid].apply(Patient(t.model, trained=True, treatment=t))


def test_every_remedy_of_the_training_watch_rules_is_an_action_or_rendered_advice():
    contexts = [{}, {"model_kind": "transformer"}, {"model_kind": "transformer", "norm_placement": "post"},
                {"low_precision": True}]
    prescribed = {rid for kind in TRAINING_KINDS for ctx in contexts for rid in prescribe(kind, ctx)}
    assert {"qk_norm", "z_loss", "lower_adam_epsilon", "lower_beta2", "weight_decay_exclusions", "lr_warmup",
            "clip_grad_norm", "skip_and_rewind", "loss_scale_floor", "higher_precision"} <= prescribed
    for rid in prescribed:
        assert rid in ACTIONS or rid in ADVICE_ONLY, rid
        assert howto(rid).torch.strip(), rid
    assert not ADVICE_ONLY & set(ACTIONS)
    assert set(ACTIONS) | ADVICE_ONLY == set(REMEDIES)
    assert all(hasattr(Treatment(model=nn.Linear(1, 1)), name) for name in RECIPE_FIELDS)


def test_adam_epsilon_and_beta2():
    t = treatment(betas=(0.8, 0.999))
    assert "1e-15" in apply(t, "lower_adam_epsilon") and "0.95" in apply(t, "lower_beta2")
    group = t.optimizer().param_groups[0]
    assert group["eps"] == 1e-15 and group["betas"] == (0.8, 0.95)  # the user's beta1 kept
    with pytest.raises(GradmedicError, match="already"):
        apply(t, "lower_adam_epsilon")
    sgd = treatment(torch.optim.SGD, momentum=0.9)
    for rid in ("lower_adam_epsilon", "lower_beta2"):
        with pytest.raises(GradmedicError, match="SGD has no"):
            apply(sgd, rid)


def test_weight_decay_off_biases_norms_and_embeddings():
    t = treatment()
    text = apply(t, "weight_decay_exclusions")
    assert "AdamW in place of Adam" in text and "0.1" in text
    optimizer = t.optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    kept = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    model = t.model
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}
    assert {names[i] for i in decayed} == matrices - {"tok.weight", "pos.weight"}
    assert {"tok.weight", "pos.weight", "ln_f.weight", "blocks.0.ln1.bias", "head.bias"} <= {names[i] for i in kept}
    assert decayed | kept == set(names)
    # the user's own decay is kept; AdamW stays AdamW
    t = treatment(torch.optim.AdamW, weight_decay=0.05)
    assert "AdamW in place" not in apply(t, "weight_decay_exclusions") and t.weight_decay == 0.05
    # from tensors only (the form treat's re-runs pass): biases and gains out, matrices in (embeddings too)
    groups = t.optimizer(list(t.model.parameters())).param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])


def test_decay_groups_with_tied_weights_and_frozen_parameters():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "norm": nn.LayerNorm(4), "mlp": nn.Linear(4, 4),
                           "head": nn.Linear(4, 10), "frozen": nn.Linear(4, 4)})
    model["head"].weight = model["embed"].weight  # tied: the head is the embedding, left out with it
    model["frozen"].requires_grad_(False)
    decay, rest = decay_groups(model, 0.3)
    assert decay["weight_decay"] == 0.3 and decay["params"] == [model["mlp"].weight]
    assert rest["weight_decay"] == 0.0 and any(p is model["embed"].weight for p in rest["params"])
    assert {id(p) for p in rest["params"]} == {id(p) for p in (model["embed"].weight, model["norm"].weight,
                                                                model["norm"].bias, model["mlp"].bias,
                                                                model["head"].bias)}
    assert not any(p is model["frozen"].weight for g in (decay, rest) for p in g["params"])
    with pytest.raises(GradmedicError, match="weight_decay"):
        decay_groups(model, -1.0)


def test_z_loss_lr_adaptive_and_precision():
    t = treatment()
    apply(t, "z_loss")
    wrapped = t.loss_fn(F.cross_entropy)
    assert isinstance(wrapped, ZLoss) and wrapped.coef == 1e-4
    assert Treatment(model=nn.Linear(1, 1)).loss_fn(F.cross_entropy) is F.cross_entropy  # no z-loss: as it was
    t.lr = 3e-4
    assert "0.003" in apply(t, "raise_learning_rate") and t.lr == pytest.approx(3e-3)
    assert "0.003 -> 0.0003" in apply(t, "lower_learning_rate") and t.lr == pytest.approx(3e-4)  # the run's lr / 10
    assert "torch.optim.Adam(model.parameters(), lr=0.001)" in howto("adaptive_optimizer").torch  # advice
    apply(t, "higher_precision")
    assert t.precision == "bfloat16" and not t.loss_scaling


def test_warmup_length_follows_beta2():
    """Ma & Yarats 2021: 2 / (1 - beta2) steps (2000 at Adam's default 0.999); an optimizer without beta2 takes the
    short default."""
    t = Treatment(model=nn.Linear(2, 2))  # Adam, betas from its signature
    assert warmup_steps(t) == 2000
    t.optimizer_defaults = {"betas": (0.9, 0.95)}
    assert warmup_steps(t) == 40
    t.beta2 = 0.98  # the recipe's own beta2 wins over the optimizer's
    assert warmup_steps(t) == 100
    assert "over the first 100 steps" in apply(t, "lr_warmup") and t.values["lr_warmup"] == {"steps": 100}
    t.optimizer_class, t.optimizer_defaults, t.beta2 = torch.optim.SGD, {}, None
    assert warmup_steps(t) == WARMUP_STEPS
