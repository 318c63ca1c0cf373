"""The remedy actions ``treat`` can carry out, registered by remedy id (one lookup instead of an if-chain).

Each action is a small function in one of this folder's modules, registered with ``@action(...)`` next to
what it needs to know about itself: how invasive it is (``tier``: treat tries the least invasive first),
whether it has a form that keeps a trained model's function and weights (``keeps_function``), whether it
needs a batch (``needs_inputs``), and whether it acts on the model or on the training recipe.
The ids and their one-line descriptions live in ``gradmedic.diagnosis.REMEDIES``; this registry only adds
the "how".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

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
    context: dict = field(default_factory=dict)  # Report.context: saturating, relu, depth, rnn, ...
    trained: bool = True  # only function-preserving changes when True
    treatment: Any = None  # the Treatment, for actions on the training recipe


@dataclass(frozen=True)
class Action:
    id: str
    apply: Callable[[Patient], str]  # changes patient.model (or the recipe) in place; returns what was done
    tier: int
    keeps_function: bool = False  # has a form that leaves a trained model's function (and weights) as they were
    needs_inputs: bool = False
    on: str = "model"  # "model" or "recipe"


ACTIONS: dict[str, Action] = {}


def action(rid: str, tier: str, keeps_function: bool = False, needs_inputs: bool = False,
           on: str = "model") -> Callable[[Callable[[Patient], str]], Callable[[Patient], str]]:
    """Register ``fn(patient) -> description`` as the action for remedy ``rid``."""
    def register(fn: Callable[[Patient], str]) -> Callable[[Patient], str]:
        ACTIONS[rid] = Action(rid, fn, TIERS[tier], keeps_function, needs_inputs, on)
        return fn
    return register


def _load() -> None:
    # the modules register their actions on import
    from gradmedic.remedies.actions import init_actions, recipe_actions, surgery_actions, transformer_actions  # noqa: F401


_load()
