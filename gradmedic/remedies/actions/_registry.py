"""The registry of ``treat``'s actions: an action is registered under a remedy id from the one catalog
(``gradmedic.diagnosis.catalog.REMEDIES``), which says what the remedy is and whether it acts on the model or on
the training recipe; the registry adds only how ``treat`` carries it out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradmedic.diagnosis.catalog import REMEDIES

__all__ = ["ACTIONS", "TIERS", "Action", "Patient", "action"]

# Invasiveness, least first: a scale or a recipe change, then reviving the units that are stuck (a few
# rows of a few tensors), then re-drawing weights, then inserting or moving layers, then changing what
# the layers compute.
TIERS = {"scale": 0, "revive": 1, "init": 2, "insert": 3, "replace": 4}


@dataclass
class Patient:
    """What an action gets: the copy to change in place, the batch, what the model is made of."""

    model: nn.Module
    inputs: Any = None
    context: Any = None  # the report's Context: saturating, relu, depth, rnn, ... (gradmedic.diagnosis.context)
    trained: bool = True  # only function-preserving changes when True
    treatment: Any = None  # the Treatment, for actions on the training recipe


@dataclass(frozen=True)
class Action:
    id: str
    apply: Callable[[Patient], str] = field(repr=False)  # changes patient.model (or the recipe) in place
    tier: int
    keeps_function: bool = False  # has a form that leaves a trained model's function (and weights) as they were
    needs_inputs: bool = False

    @property
    def on(self) -> str:
        """"model" or "recipe", read from the catalog entry (``Remedy.acts_on``), which is said once."""
        return "recipe" if REMEDIES[self.id].acts_on == "training" else "model"


ACTIONS: dict[str, Action] = {}


def action(rid: str, tier: str, keeps_function: bool = False,
           needs_inputs: bool = False) -> Callable[[Callable[[Patient], str]], Callable[[Patient], str]]:
    """Register ``fn(patient) -> description`` as the action for remedy ``rid``, an id of the catalog."""
    if rid not in REMEDIES:
        raise ValueError(f"Argument rid should be a remedy id from gradmedic.diagnosis.REMEDIES, but given {rid!r}.")
    if tier not in TIERS:
        raise ValueError(f"Argument tier should be one of {sorted(TIERS)}, but given {tier!r}.")

    def register(fn: Callable[[Patient], str]) -> Callable[[Patient], str]:
        ACTIONS[rid] = Action(rid, fn, TIERS[tier], keeps_function, needs_inputs)
        return fn
    return register
