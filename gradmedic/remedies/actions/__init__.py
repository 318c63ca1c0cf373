"""The remedy actions ``treat`` can carry out, registered by remedy id (one lookup instead of an if-chain).

Each action is a small function in one of this folder's modules, registered with ``@action(...)`` next to
what it needs to know about itself: how invasive it is (``tier``: treat tries the least invasive first),
whether it has a form that keeps a trained model's function and weights (``keeps_function``) and whether it
needs a batch (``needs_inputs``). The ids, their one-line descriptions and whether a remedy acts on the model
or the training recipe live in the catalog (``gradmedic.diagnosis.REMEDIES``); this registry only adds the
"how". Importing this package registers every action.
"""

from __future__ import annotations

from gradmedic.remedies.actions import init_actions, recipe_actions, surgery_actions, transformer_actions  # noqa: F401
from gradmedic.remedies.actions._registry import ACTIONS, TIERS, Action, Patient, action

__all__ = ["ACTIONS", "TIERS", "Action", "Patient", "action"]
