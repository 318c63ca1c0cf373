"""Calling a model on inputs given as a tensor, a tuple (positional) or a dict (keyword); the loss that check, treat
and the verification runs take of its outputs; and the user's optimizer rebuilt over other parameters (a copy's,
a trial's). One place for each, so that every stage calls a model and trains a copy the same way."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument, first_line
from gradmedic._tensors import first_float_tensor, float_tensors

__all__ = ["PROJECTION_SEED", "describe", "forward_loss", "forward_with_hooks", "loss_of", "optimizer_defaults",
           "rebuild_optimizer", "run_forward", "split_inputs"]

PROJECTION_SEED = 0  # the fixed random projection used when no loss is given


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


def forward_loss(model: nn.Module, args: tuple, kwargs: dict, targets: Any,
                  loss_fn: Callable | None) -> tuple[torch.Tensor, str]:
    """The model's forward and the loss, with what the loss is (see ``loss_of``)."""
    try:
        outputs = model(*args, **kwargs)
    except Exception as error:
        raise GradmedicError(f"The model's forward failed on these inputs ({type(error).__name__}: "
                             f"{first_line(error)}); check their shapes, dtypes and device against the model.") \
            from error
    try:
        loss, how = loss_of(outputs, targets, loss_fn)
    except GradmedicError:
        raise
    except Exception as error:
        raise GradmedicError(f"The loss failed ({type(error).__name__}: {first_line(error)}); check that "
                             "loss_fn(outputs, targets) fits the model's outputs.") from error
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise GradmedicError(f"The loss should be a floating-point scalar tensor, but it is {describe(loss)}; "
                             "make loss_fn return one.")
    if not loss.requires_grad:
        raise GradmedicError("The loss does not depend on any trainable parameter (it has no grad_fn); check that "
                             "the model's forward is not under torch.no_grad() and that loss_fn uses its outputs.")
    return loss.reshape(()), how


def loss_of(outputs: Any, targets: Any, loss_fn: Callable | None) -> tuple[torch.Tensor, str]:
    """The loss, and what it is: "given" (loss_fn), "model" (the outputs' own ``.loss``), "targets" (cross-entropy
    or MSE against them), "projection" (the stand-in, of the model's only floating-point output) or
    "projection_of_first" (the stand-in, of the first of several: the others get no gradient from it)."""
    if loss_fn is not None:
        return loss_fn(outputs, targets), "given"
    hf_loss = first_float_tensor(outputs, prefer_loss=True)
    has_loss = hf_loss is not None and hf_loss.numel() == 1 and (
        getattr(outputs, "loss", None) is hf_loss or (isinstance(outputs, Mapping) and outputs.get("loss") is hf_loss))
    if targets is None and has_loss:
        return hf_loss, "model"
    out = first_float_tensor(outputs)
    if out is None:
        raise GradmedicError(f"The model returned no floating-point tensor ({describe(outputs)}); pass loss_fn.")
    if targets is None:
        gen = torch.Generator(device=out.device).manual_seed(PROJECTION_SEED)
        projection = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        # the mean, not the sum: dL/d(output) = projection / numel, what mean-squared error on unit-scale
        # errors gives, so the gradient does not grow with the sequence length or width of the output
        # "projection_of_first" when the outputs hold other floating-point tensors, which this loss leaves out
        others = next(itertools.islice(float_tensors(outputs), 1, None), None) is not None
        return (out * projection).mean(), "projection_of_first" if others else "projection"
    if not isinstance(targets, torch.Tensor):
        raise GradmedicError(f"targets should be a tensor when no loss_fn is given, but given {describe(targets)}; "
                             "pass loss_fn.")
    if not targets.is_floating_point() and out.dim() >= 2 and targets.shape == out.shape[:1] + out.shape[2:]:
        return nn.functional.cross_entropy(out, targets), "targets"
    if targets.is_floating_point() and targets.shape == out.shape:
        return nn.functional.mse_loss(out, targets), "targets"
    raise GradmedicError(f"No default loss fits outputs {tuple(out.shape)} and targets {tuple(targets.shape)} "
                         f"({targets.dtype}); pass loss_fn(outputs, targets).")


def describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def optimizer_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's hyperparameters that its constructor takes (``defaults`` also holds entries some optimizers
    add for themselves, which their constructor refuses)."""
    accepted = inspect.signature(type(optimizer)).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


def rebuild_optimizer(optimizer: torch.optim.Optimizer, params: Any) -> torch.optim.Optimizer:
    """A fresh optimizer of the user's class and hyperparameters over ``params`` (tensors or param groups)."""
    return type(optimizer)(params, **optimizer_defaults(optimizer))
