"""Calling a model on inputs given as a tensor, a tuple (positional) or a dict (keyword)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradmedic._errors import bad_argument

__all__ = ["forward_with_hooks", "run_forward", "split_inputs"]


def split_inputs(inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for ``model(*args, **kwargs)``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    raise bad_argument("inputs", "a tensor, a tuple of tensors (positional arguments) or a dict (keyword "
                       "arguments)", inputs)


def run_forward(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


@torch.no_grad()
def forward_with_hooks(model: nn.Module, inputs: Any, modules: Iterable[nn.Module],
                       hook: Callable[[nn.Module, Any, Any], None]) -> Any:
    """One no-grad forward with ``hook(module, args, output)`` on ``modules``; the hooks are gone after."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        return run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
