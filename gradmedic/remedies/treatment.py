"""What ``gm.treat`` hands back: the ``Treatment`` (the treated copy, what was done and why, the training recipe,
the evidence) and ``trial_order``, the one order in which a finding's remedies are tried, which the terminal, the
page and the JSON show as the first remedy too."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic._display import html_of
from gradmedic.diagnosis import REMEDIES, Report
from gradmedic.remedies.actions import ACTIONS
from gradmedic.remedies.groups import decay_groups
from gradmedic.remedies.howto import HowTo, howto, treatment_howto
from gradmedic.remedies.precision import ScaledStep
from gradmedic.remedies.verify import Evidence
from gradmedic.remedies.zloss import ZLoss

__all__ = ["RECIPE_FIELDS", "Treatment", "trial_order"]

# The Treatment's fields that the training-recipe actions set: what a trial saves before it and puts back after it
# unless it is kept (``getattr`` each; the actions never change a dict in place, they assign a new one). ``values``
# is not among them: it is keyed by remedy id and read only for the remedies kept.
RECIPE_FIELDS = ("lr", "schedule", "clip", "loss_scaling", "eps", "beta2", "weight_decay", "decay_exclusions",
                 "z_loss", "precision", "optimizer_class", "optimizer_defaults")


@dataclass
class Treatment:
    """The treated copy, what was done to it and why, what was not done, and the training recipe."""

    model: nn.Module
    applied: list[tuple[str, str, str]] = field(default_factory=list)  # (remedy id, what was done, why)
    advice: list[tuple[str, str]] = field(default_factory=list)  # (remedy id, why it was not done)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (remedy id, why it did not apply or help)
    recipe: list[str] = field(default_factory=list)  # training-side remedy ids, in the order found
    redrawn: dict[str, int] = field(default_factory=dict)  # remedy id -> existing tensors re-drawn or rescaled
    trained: bool = True  # the weights were treated as trained (only function-preserving changes)
    trained_reason: str = ""
    evidence: list[Evidence] = field(default_factory=list)  # verification runs, the untreated one first
    lr: float = 1e-3
    clip: Callable[[Iterable[torch.Tensor]], torch.Tensor] | None = None
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None
    loss_scaling: bool = False
    report: Report | None = None  # the last check of the treated model (with inputs)
    # the caller's optimizer class and its hyperparameters (``treat(..., optimizer=)``), the learning rate aside
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam
    optimizer_defaults: dict[str, Any] = field(default_factory=dict)
    # the recipe's optimizer settings, set by its actions (None: as the caller's optimizer has them)
    eps: float | None = None  # Adam's epsilon (lower_adam_epsilon)
    beta2: float | None = None  # Adam's beta2 (lower_beta2)
    weight_decay: float | None = None  # (weight_decay_exclusions)
    decay_exclusions: bool = False  # no decay on biases, norms, embeddings: ``decay_groups`` (weight_decay_exclusions)
    z_loss: float = 0.0  # z-loss coefficient added to the loss, 0 for none (z_loss; ``loss_fn``)
    precision: str | None = None  # autocast dtype name ("bfloat16", "float32": none) for the loop; None: the run's
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # remedy id -> the values its action chose

    def optimizer(self, params: nn.Module | Iterable[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``params`` (the treated model by default; a module, or its tensors): the
        caller's class and hyperparameters when ``treat`` was given one, else Adam, at the recipe's learning rate,
        with its epsilon, beta2 and weight decay where set, and with ``decay_exclusions`` the ``decay_groups``
        (pass a module for them to know embeddings; from tensors only those under 2 dimensions are left out)."""
        source = self.model if params is None else params
        accepted = inspect.signature(self.optimizer_class).parameters
        kwargs = dict(self.optimizer_defaults)
        if "lr" in accepted and "lr" not in kwargs:
            kwargs["lr"] = self.lr
        if self.eps is not None and "eps" in accepted:
            kwargs["eps"] = self.eps
        if self.beta2 is not None and "betas" in accepted:
            kwargs["betas"] = (tuple(kwargs.get("betas") or (0.9, 0.999))[0], self.beta2)
        if self.weight_decay is not None and "weight_decay" in accepted:
            kwargs["weight_decay"] = self.weight_decay
        if self.decay_exclusions:
            source = decay_groups(source, float(kwargs.get("weight_decay") or 0.0))
        elif isinstance(source, nn.Module):
            source = source.parameters()
        return self.optimizer_class(source, **kwargs)

    def loss_fn(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> Callable | None:
        """``loss_fn`` with the recipe's loss changes: the z-loss added (``ZLoss``; None: the outputs' own loss, or
        cross-entropy/MSE against the targets) when ``z_loss`` is set, else ``loss_fn`` as it is."""
        return ZLoss(loss_fn, self.z_loss) if self.z_loss else loss_fn

    def note(self, rid: str, **values: Any) -> None:
        """Record the values remedy ``rid``'s action chose (for ``howto``); a new dict, never changed in place."""
        self.values = {**self.values, rid: dict(values)}

    def howto(self) -> HowTo:
        """Everything applied to the model and put in the recipe, in the user's own terms: one ``HowTo`` whose
        ``torch`` is plain PyTorch (the ``gradmedic.remedies`` calls on the model, one optimizer line, the loop's
        lines), ``huggingface`` the ``TrainingArguments`` fields, ``lightning`` the ``Trainer`` arguments and what
        goes in ``configure_optimizers``/``training_step``; ``lines()`` for printing."""
        return treatment_howto(self)

    def advice_howto(self) -> list[HowTo]:
        """The same for each remedy that was not done (``advice``): what to change by hand."""
        return [howto(rid) for rid, _ in self.advice]

    def stepper(self, optimizer: torch.optim.Optimizer) -> ScaledStep | None:
        """A ``ScaledStep`` (loss scaling, then clipping) when the recipe calls for loss scaling."""
        return ScaledStep(optimizer, clip=self.clip) if self.loss_scaling else None

    @property
    def kept(self) -> list[Evidence]:
        """The verification runs of the stages that were kept (the untreated one first)."""
        return [e for e in self.evidence if e.kept]

    def __repr__(self) -> str:
        """Not the dataclass's: that one printed the whole treated model."""
        kept = [e.stage for e in self.evidence if e.kept and e.stage != "untreated"]
        return (f"Treatment(applied={[rid for rid, _, _ in self.applied]}, recipe={self.recipe}, "
                f"skipped={[rid for rid, _ in self.skipped]}, trained={self.trained}"
                + (f", verified_kept={kept}" if self.evidence else "") + ")")

    def _repr_html_(self) -> str:
        return html_of(self)  # drawn by the report stage (gradmedic.report.notebook registers it)

    def __str__(self) -> str:
        weights = f"weights treated as {'trained' if self.trained else 'fresh'} ({self.trained_reason})"
        lines = [weights] + ([f"{rid}: {what} (because {why})" for rid, what, why in self.applied]
                             or ["nothing applied to the model"])
        lines += [f"training recipe: {rid} - {REMEDIES[rid].description}" for rid in self.recipe]
        lines += [f"not done, {rid}: {why}" for rid, why in self.advice]
        lines += [f"tried, not kept, {rid}: {why}" for rid, why in self.skipped]
        steps = self.howto()
        if steps.remedies:
            lines.append("to do the same in your code:")
            lines += ["  " + line for line in steps.lines()]
        for rid, how in zip((rid for rid, _ in self.advice), self.advice_howto(), strict=True):
            lines.append(f"by hand, {rid}: " + how.torch.splitlines()[0])
        if self.evidence:
            lines.append("verified by training (score: mean loss over the last steps): " + ", ".join(
                f"{e.stage} {e.score:.4g}{'' if e.kept else ' (not kept)'}" for e in self.evidence))
        return "\n".join(lines)



def trial_order(remedies: list[str]) -> list[str]:
    """The model changes ``treat`` tries for a finding with these ranked remedies, in its order: least invasive
    first, the diagnosis's rank within a tier (the first that clears the finding is kept). Training-side
    remedies are not tried on the model; they go to the recipe."""
    ranked = [rid for rid in remedies if rid in ACTIONS and ACTIONS[rid].on == "model"]
    return sorted(ranked, key=lambda rid: ACTIONS[rid].tier)  # stable: rank order kept within a tier
