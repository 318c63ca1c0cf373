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
from gradmedic.remedies.precision import ScaledStep
from gradmedic.remedies.verify import Evidence

__all__ = ["Treatment", "trial_order"]


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

    def optimizer(self, params: Iterable[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """The optimizer the verification runs trained with, at the recipe's learning rate, over ``params`` (the
        treated model's by default): the caller's class and hyperparameters when ``treat`` was given one, else
        Adam."""
        params = self.model.parameters() if params is None else params
        takes_lr = "lr" in inspect.signature(self.optimizer_class).parameters and "lr" not in self.optimizer_defaults
        return self.optimizer_class(params, **({"lr": self.lr} if takes_lr else {}), **self.optimizer_defaults)

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
