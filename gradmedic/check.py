"""``gm.check``: one look at a model, on a deep copy, with every probe and the init-time signal view.

The user's model, its gradients, its optimizer and the global RNG state are left exactly as they were:
the work happens on ``copy.deepcopy(model)`` inside ``torch.random.fork_rng``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument, first_line
from gradmedic._inputs import split_inputs
from gradmedic._tensors import first_float_tensor
from gradmedic.diagnosis import Report, diagnose
from gradmedic.monitor import Monitor
from gradmedic.probes import SignalProbe, build_probes

__all__ = ["check"]

PROJECTION_SEED = 0  # the fixed random projection used when no loss is given


def check(model: nn.Module, inputs: Any, targets: Any = None, loss_fn: Callable | None = None,
          optimizer: torch.optim.Optimizer | None = None, steps: int = 0) -> Report:
    """Forward and backward on a copy of ``model`` (plus ``steps`` optimizer steps), then diagnose.

    ``inputs``: a tensor, a tuple of tensors (positional arguments) or a dict (keyword arguments).
    Without ``loss_fn``: a ``.loss`` in the outputs is used (Hugging Face models given labels), else
    cross-entropy for integer ``targets`` and MSE for float ``targets``, else a fixed-seed random
    projection of the outputs (averaged, so its scale does not grow with the output's size), so that every
    output contributes. With ``steps`` > 0, a fresh copy of
    ``optimizer`` (same class and hyperparameters, empty state) or Adam(lr=1e-3) trains the copy.
    """
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise bad_argument("steps", "a non-negative int (optimizer steps after the first look)", steps)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise bad_argument("optimizer", "a torch.optim.Optimizer or None", optimizer)
    if loss_fn is not None and not callable(loss_fn):
        raise bad_argument("loss_fn", "a callable loss_fn(outputs, targets)", loss_fn)
    if not any(p.requires_grad for p in model.parameters()):
        raise bad_argument("model", "a module with trainable parameters", type(model).__name__)
    args, kwargs = split_inputs(inputs)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            work = copy.deepcopy(model)
        except Exception as error:
            raise GradmedicError(f"check works on a copy, and copy.deepcopy(model) failed ({type(error).__name__}: "
                                 f"{first_line(error)}); make the model deep-copyable.") from error
        for p in work.parameters():
            p.grad = None
        opt = _optimizer_for(work, model, optimizer) if steps else None
        probes = [*build_probes("full"), SignalProbe()]
        with Monitor(work, probes=probes, flush_every=steps + 2) as monitor:
            for step in range(steps + 1):
                if step:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                loss = _forward_loss(work, args, kwargs, targets, loss_fn)
                loss.backward()
                monitor.step(loss)
    monitor.trace.meta["check"] = {"steps": steps, "loss": "given" if loss_fn else "default"}
    return diagnose(monitor.trace)


def _forward_loss(model: nn.Module, args: tuple, kwargs: dict, targets: Any, loss_fn: Callable | None) -> torch.Tensor:
    try:
        outputs = model(*args, **kwargs)
    except Exception as error:
        raise GradmedicError(f"The model's forward failed on these inputs ({type(error).__name__}: "
                             f"{first_line(error)}); check their shapes, dtypes and device against the model.") \
            from error
    try:
        loss = _loss(outputs, targets, loss_fn)
    except GradmedicError:
        raise
    except Exception as error:
        raise GradmedicError(f"The loss failed ({type(error).__name__}: {first_line(error)}); check that "
                             "loss_fn(outputs, targets) fits the model's outputs.") from error
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise GradmedicError(f"The loss should be a floating-point scalar tensor, but it is {_describe(loss)}; "
                             "make loss_fn return one.")
    if not loss.requires_grad:
        raise GradmedicError("The loss does not depend on any trainable parameter (it has no grad_fn); check that "
                             "the model's forward is not under torch.no_grad() and that loss_fn uses its outputs.")
    return loss.reshape(())


def _loss(outputs: Any, targets: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(outputs, targets)
    hf_loss = first_float_tensor(outputs, prefer_loss=True)
    has_loss = hf_loss is not None and hf_loss.numel() == 1 and (
        getattr(outputs, "loss", None) is hf_loss or (isinstance(outputs, Mapping) and outputs.get("loss") is hf_loss))
    if targets is None and has_loss:
        return hf_loss
    out = first_float_tensor(outputs)
    if out is None:
        raise GradmedicError(f"The model returned no floating-point tensor ({_describe(outputs)}); pass loss_fn.")
    if targets is None:
        gen = torch.Generator(device=out.device).manual_seed(PROJECTION_SEED)
        projection = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        # the mean, not the sum: dL/d(output) = projection / numel, what mean-squared error on unit-scale
        # errors gives, so the gradient does not grow with the sequence length or width of the output
        return (out * projection).mean()
    if not isinstance(targets, torch.Tensor):
        raise GradmedicError(f"targets should be a tensor when no loss_fn is given, but given {_describe(targets)}; "
                             "pass loss_fn.")
    if not targets.is_floating_point() and out.dim() >= 2 and targets.shape == out.shape[:1] + out.shape[2:]:
        return nn.functional.cross_entropy(out, targets)
    if targets.is_floating_point() and targets.shape == out.shape:
        return nn.functional.mse_loss(out, targets)
    raise GradmedicError(f"No default loss fits outputs {tuple(out.shape)} and targets {tuple(targets.shape)} "
                         f"({targets.dtype}); pass loss_fn(outputs, targets).")


def _optimizer_for(work: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer | None):
    if optimizer is None:
        return torch.optim.Adam(work.parameters(), lr=1e-3)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    copies = list(work.parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [copies[index[id(p)]] for p in g["params"] if id(p) in index]} for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        return type(optimizer)([g for g in groups if g["params"]], **defaults)
    except Exception as error:
        raise GradmedicError(f"Could not rebuild {type(optimizer).__name__} for the copy ({first_line(error)}); "
                             "pass optimizer=None to train the copy with Adam(lr=1e-3).") from error


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"

