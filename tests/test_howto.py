"""Every remedy in the user's own terms (``gradmedic.remedies.howto``): each id of the catalog renders a PyTorch
snippet that compiles (and, for those that can run on a small model, runs and does what the Treatment does), Hugging
Face ``TrainingArguments`` fields that the installed transformers has and accepts, and Lightning ``Trainer`` arguments
that the installed lightning takes; a Treatment renders its applied remedies and recipe as one, with one optimizer line
that builds the Treatment's optimizer."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradmedic
from gradmedic import GradmedicError
from gradmedic.diagnosis import REMEDIES
from gradmedic.remedies import HowTo, Treatment, howto
from gradmedic.remedies.actions import ACTIONS, Patient
from gradmedic.remedies.howto_parts import Code
from tests import training_runs as corpus

# snippets that run on the MLP namespace below (the others need an RNN, a residual net or are the model's own code)
RUNS_ON_MLP = {"add_normalization", "swap_activation", "he_init", "xavier_init", "orthogonal_init", "lsuv_init",
               "recycle_dormant", "gradcheck", "clip_grad_norm", "clip_grad_value", "autoclip", "agc",
               "lower_learning_rate", "raise_learning_rate", "adaptive_optimizer", "lr_warm_restarts", "lr_warmup",
               "loss_scaling", "higher_precision", "z_loss", "lower_adam_epsilon", "lower_beta2",
               "weight_decay_exclusions", "skip_and_rewind", "accumulate", "loss_scale_floor", "numerical_guard"}


def mlp_namespace() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    F.cross_entropy(model(x), y).backward()  # gradients for the clipping lines
    logits = model(x)
    return {"torch": torch, "nn": nn, "F": F, "gradmedic": gradmedic, "model": model, "inputs": x, "x": x, "y": y,
            "logits": logits, "targets": y, "loss_fn": F.cross_entropy, "device_type": "cpu", "step": 0,
            "optimizer": torch.optim.Adam(model.parameters()), "module": nn.Linear(8, 2), "layer": model[0],
            "micro_batches": [(x[:16], y[:16]), (x[16:], y[16:])]}


@pytest.mark.parametrize("rid", sorted(REMEDIES))
def test_every_remedy_renders_and_its_torch_snippet_compiles(rid, tmp_path, monkeypatch):
    how = howto(rid)
    assert isinstance(how, HowTo) and how.remedies == (rid,)
    assert how.torch.strip() and how.huggingface.strip() and how.lightning.strip()
    compile(how.torch, f"<howto {rid}>", "exec")
    lines = how.lines()
    assert lines[0].startswith("PyTorch: ") and any(line.startswith("Hugging Face: ") for line in lines)
    if REMEDIES[rid].acts_on == "training":  # the loop's frameworks have a place for each
        assert how.hf_fields or "Trainer subclass" in how.huggingface, rid
        assert how.lightning_args or "def configure_" in how.lightning or "training_step" in how.lightning, rid
    if rid in RUNS_ON_MLP:
        monkeypatch.chdir(tmp_path)  # skip_and_rewind saves a checkpoint
        namespace = mlp_namespace()
        exec(how.torch, namespace)  # noqa: S102 - our own snippet


def test_hugging_face_fields_exist_and_are_accepted(tmp_path):
    transformers = pytest.importorskip("transformers")
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    for rid in REMEDIES:
        how = howto(rid)
        assert set(how.hf_fields) <= fields, (rid, set(how.hf_fields) - fields)
        if how.hf_fields:
            transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **how.hf_fields)
    # the warmup ratio under the installed version's name
    ratio = howto("lr_warmup", ratio=0.1).hf_fields
    assert set(ratio) <= fields and list(ratio.values()) == [0.1]
    # what the text says goes in code exists there
    assert hasattr(transformers.TrainerCallback, "on_pre_optimizer_step")
    assert hasattr(transformers.Trainer, "compute_loss") and hasattr(transformers.Trainer, "create_optimizer")
    assert "resume_from_checkpoint" in inspect.signature(transformers.Trainer.train).parameters


@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")  # Lightning says it uses bfloat16 here
def test_lightning_arguments_exist_and_are_accepted():
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    accepted = inspect.signature(lightning.Trainer.__init__).parameters
    for rid in REMEDIES:
        args = dict(howto(rid).lightning_args)
        assert set(args) <= set(accepted), (rid, set(args) - set(accepted))
        if args:
            args = {k: eval(v, {"ModelCheckpoint": ModelCheckpoint}) if isinstance(v, Code) else v  # noqa: S307
                    for k, v in args.items()}
            lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                              **args)
    for method in ("configure_optimizers", "configure_gradient_clipping", "training_step"):
        assert hasattr(lightning.LightningModule, method)
    assert "ckpt_path" in inspect.signature(lightning.Trainer.fit).parameters


def test_values_chosen_are_rendered_and_wrong_ones_refused():
    how = howto("clip_grad_norm", max_norm=0.5)
    assert "max_norm=0.5" in how.torch and how.hf_fields == {"max_grad_norm": 0.5}
    assert how.lightning_args == {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}
    assert howto("lr_warmup", steps=250).hf_fields == {"warmup_steps": 250}
    assert "eps=1e-15" in howto("lower_adam_epsilon").torch
    with pytest.raises(GradmedicError, match="max_norm"):
        howto("clip_grad_norm", max_nrom=0.5)
    with pytest.raises(GradmedicError, match="remedy"):
        howto("no_such_remedy")


def test_treatment_renders_its_recipe_as_one_and_the_optimizer_line_builds_its_optimizer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    t = Treatment(model=corpus.GPT(), optimizer_class=torch.optim.Adam, optimizer_defaults={"betas": (0.8, 0.999)},
                  lr=3e-4)  # a warmup of 2 / (1 - 0.999) = 2000 steps (Ma & Yarats 2021)
    for rid in ("lr_warmup", "clip_grad_norm", "lower_adam_epsilon", "lower_beta2", "weight_decay_exclusions",
                "z_loss"):
        ACTIONS[rid].apply(Patient(t.model, trained=True, treatment=t))
        t.recipe.append(rid)
    ACTIONS["qk_norm"].apply(Patient(t.model, trained=False, treatment=t))
    t.applied.append(("qk_norm", "QK-norm", "attention_logit_growth"))
    how = t.howto()
    assert how.remedies == ("qk_norm", "lr_warmup", "clip_grad_norm", "lower_adam_epsilon", "lower_beta2",
                            "weight_decay_exclusions", "z_loss")
    assert sum(line.startswith("optimizer = ") for line in how.torch.splitlines()) == 1
    assert how.hf_fields == {"warmup_steps": 2000, "max_grad_norm": 1.0, "adam_epsilon": 1e-15, "adam_beta2": 0.95,
                             "weight_decay": 0.1, "learning_rate": 3e-4}
    # the snippet, run on the user's own (untreated) model, makes the Treatment's model and optimizer
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = mlp_namespace()
    namespace["model"] = corpus.GPT()
    ids = torch.randint(0, corpus.VOCAB, (4, 16))
    namespace.update(inputs=ids, x=ids, logits=namespace["model"](ids), targets=ids)
    exec(how.torch, namespace)  # noqa: S102 - our own snippet
    mine, theirs = namespace["optimizer"], t.optimizer()
    assert type(mine) is type(theirs) is torch.optim.AdamW
    for a, b in zip(mine.param_groups, theirs.param_groups, strict=True):
        assert a["initial_lr"] == b["lr"]  # the snippet's warmup scheduler holds the learning rate at lr / 2000 now
        for key in ("eps", "betas", "weight_decay"):
            assert a[key] == b[key], key
        assert [p.shape for p in a["params"]] == [p.shape for p in b["params"]]
    assert set(namespace["model"].state_dict()) == set(t.model.state_dict())  # qk_norm_ made the same keys
    scheduler = namespace["scheduler"]
    assert scheduler.get_last_lr()[0] == pytest.approx(3e-4 / 2000)  # warmup from lr / steps, as linear_warmup
    # printed with the Treatment
    text = str(t)
    assert "to do the same in your code:" in text and "TrainingArguments(warmup_steps=2000" in text
    assert "gradmedic.remedies.qk_norm_(model)" in text and "z_loss(logits, coef=1e-4)" in text


def test_advice_renders_what_to_change_by_hand():
    t = Treatment(model=nn.Linear(2, 2))
    t.advice.append(("pre_ln", "for warning vanishing_gradients at the model: not done on trained weights"))
    [how] = t.advice_howto()
    assert "norm_first=True" in how.torch and "by hand, pre_ln:" in str(t)
