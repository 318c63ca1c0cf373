"""The Monitor's arguments, checked eagerly with one message template ("Argument X should be ..., but given ..."),
before anything is attached to the user's model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic._errors import bad_argument
from gradmedic.probes import PRESETS, Probe

__all__ = ["check_arguments"]


def check_arguments(model: Any, optimizer: Any, preset: Any, every: Any, flush_every: Any, probes: Any,
                    distributed: Any, on_finding: Any) -> None:
    """One line naming the first argument that is wrong and what it should be."""
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise bad_argument("optimizer", "a torch.optim.Optimizer or None", optimizer)
    if preset not in PRESETS:
        raise bad_argument("preset", f"one of {sorted(PRESETS)}", preset)
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise bad_argument("every", "a positive int or None", every)
    if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
        raise bad_argument("flush_every", "a positive int (steps between device-to-host copies)", flush_every)
    if probes is not None and not all(isinstance(p, Probe) for p in probes):
        raise bad_argument("probes", "a list of gradmedic probe instances", probes)
    if not any(True for _ in model.parameters()):
        raise bad_argument("model", "a module with parameters", type(model).__name__,
                           "There is no gradient to watch in a model without parameters.")
    if on_finding is not None and not callable(on_finding):
        raise bad_argument("on_finding", "a callable taking a Finding, or None", on_finding)
    if distributed not in (None, True, False):
        raise bad_argument("distributed", "None (combine across ranks when a process group is initialised),"
                           " True or False", distributed)
