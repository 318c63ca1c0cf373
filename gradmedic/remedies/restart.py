"""Reviving stuck units (ReDo) and restarting a run that has stalled.

``recycle_`` follows Sokar et al. (2023), "The dormant neuron phenomenon in deep RL" (ReDo): a unit's
score is its mean |activation| over the batch divided by the layer's mean of that; a unit scoring at
most ``tau`` (0.1) is dormant. For saturating activations (sigmoid/tanh) a unit is stuck when it passes
on no *gradient*, so the score there is the unit's mean derivative over the layer's mean derivative.
A dormant unit's incoming weights are re-drawn (PyTorch's default Linear/Conv init) and its bias
zeroed; its outgoing weights are zeroed, after folding its mean output into the next layer's bias, so
the network computes the same function at the moment of the reset. The optimizer's moments for those
entries are reset too. The last weighted layer (the output) is never recycled. With ``redraw=False``
(for trained weights) nothing is re-drawn: the unit keeps its incoming weights and its bias is re-centred
so that its pre-activation is 0 at the median sample of the batch (a dead ReLU fires again for half the
batch, a saturated unit sits at its steepest point); with its outgoing weights zeroed the output is still
unchanged, and the unit learns from there.

``RestartOnVanishing``: after ``patience`` consecutive reports with vanishing gradients, re-initialise
the model with a better init (He for ReLU nets, Xavier otherwise) and say so.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument, first_line
from gradmedic._inputs import forward_with_hooks
from gradmedic.probes.activations import activation_family
from gradmedic.remedies._weights import is_parametrized
from gradmedic.remedies.init import following_positions, forward_order, he_, xavier_

__all__ = ["RestartOnVanishing", "dormant_units", "recycle_"]

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def _unit_axis_mean(y: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the unit axis (1 for (B, C) and (B, C, ...) maps)."""
    dims = tuple(d for d in range(y.dim()) if d != 1)
    return y.mean(dim=dims) if dims else y


def _derivative(family_name: str, y: torch.Tensor) -> torch.Tensor:
    if family_name == "sigmoid":
        return y * (1 - y) / 0.25
    if family_name == "tanh":
        return 1 - y * y
    return (y.abs() < 1).to(y.dtype)  # hardtanh-like: 1 inside, 0 on the flat parts


@torch.no_grad()
def dormant_units(model: nn.Module, inputs: Any, tau: float = 0.1) -> dict[nn.Module, torch.Tensor]:
    """For each weighted layer that feeds an activation: a bool mask of its dormant output units."""
    if not 0 <= tau < 1:
        raise bad_argument("tau", "a float in [0, 1)", tau)
    return _dormant(*_follows_and_outputs(model, inputs), tau)


Follows = dict[nn.Module, nn.Module]  # weighted layer -> the activation after it
Outputs = dict[nn.Module, torch.Tensor]  # weighted layer -> that activation's output


def _follows_and_outputs(model: nn.Module, inputs: Any) -> tuple[Follows, Outputs]:
    """Each weighted layer that feeds an activation -> that activation (a module, or a stand-in for a functional
    call such as ``F.relu``), and the output of that call, from one forward."""
    order, outputs = forward_order(model, inputs)
    at = {layer: place for layer, place in following_positions(order).items() if place is not None}
    return ({layer: order[place] for layer, place in at.items()},
            {layer: outputs[place] for layer, place in at.items() if place in outputs})


def _dormant(follows: Follows, captured: Outputs, tau: float) -> dict[nn.Module, torch.Tensor]:
    """Per weighted layer, its dormant units (see ``dormant_units``); ``captured``: its activation's output."""
    masks = {}
    for layer, act in follows.items():
        y = captured.get(layer)
        if y is None or y.dim() < 2:
            continue
        family = activation_family(act)
        if family is not None and family.saturated is not None and not family.dies:
            score = _unit_axis_mean(_derivative(family.name, y.float()))
        else:
            score = _unit_axis_mean(y.float().abs())
        masks[layer] = score <= tau * score.mean().clamp_min(1e-12)
    return masks


def _consumers(model: nn.Module, inputs: Any) -> dict[nn.Module, nn.Module]:
    """The weighted layer that runs next after each weighted layer (forward order)."""
    order: list[nn.Module] = []
    weighted = [m for m in model.modules() if isinstance(m, _WEIGHTED)]
    forward_with_hooks(model, inputs, weighted, lambda mod, a, o: order.append(mod))
    order = list(dict.fromkeys(order))
    return {a: b for a, b in zip(order[:-1], order[1:], strict=True)}


def _reset_state(optimizer: torch.optim.Optimizer | None, p: torch.Tensor, index: Any) -> None:
    if optimizer is None:
        return
    for value in optimizer.state.get(p, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            value[index] = 0


@torch.no_grad()
def recycle_(model: nn.Module, inputs: Any, optimizer: torch.optim.Optimizer | None = None,
             tau: float = 0.1, redraw: bool = True) -> dict[str, int]:
    """Re-initialise dormant units in place (ReDo). Returns {layer name: units recycled}.
    ``redraw=False``: keep the incoming weights and re-centre the bias instead (see the module docstring).
    Layers with a parametrized weight (weight norm, spectral norm) are left out: a row of theirs is spread over
    several parameters and their optimizer state."""
    names = {m: n for n, m in model.named_modules()}
    if not 0 <= tau < 1:
        raise bad_argument("tau", "a float in [0, 1)", tau)
    follows, captured = _follows_and_outputs(model, inputs)
    masks = _dormant(follows, captured, tau)
    consumers = _consumers(model, inputs)
    pre: dict[nn.Module, torch.Tensor] = {}
    if not redraw:
        forward_with_hooks(model, inputs, list(masks), lambda m, a, o: pre.__setitem__(m, o.detach()))
    done: dict[str, int] = {}
    outgoing_to_zero: list[tuple[nn.Module, torch.Tensor]] = []
    for layer, mask in masks.items():
        nxt = consumers.get(layer)
        if nxt is None or not bool(mask.any()):
            continue  # the output layer, or nothing dormant
        if is_parametrized(layer) or is_parametrized(nxt):
            continue  # a weight-normed row is two parameters (magnitude, direction) and their optimizer state: left
        if nxt.weight.shape[1] != mask.numel():
            continue  # a flatten or reshape in between: the unit-to-column map is not one to one
        if not redraw and layer.bias is None:
            continue  # nothing to re-centre without a bias, and nothing may be re-drawn
        units = mask.nonzero().flatten()
        # 1. fold each unit's mean output into the next layer's bias (its outgoing weights go to zero below)
        mean_out = _unit_axis_mean(captured[layer].float())[units]
        if nxt.bias is not None:
            outgoing = nxt.weight[:, units]
            nxt.bias.add_(outgoing.reshape(outgoing.shape[0], len(units), -1).sum(-1) @ mean_out.to(outgoing.dtype))
        outgoing_to_zero.append((nxt, units))
        if not redraw:  # 2'. keep the weights; centre the pre-activation at the batch median
            z = pre[layer].float().movedim(1, 0).reshape(mask.numel(), -1)[units]  # (units, samples)
            layer.bias[units] -= z.median(dim=1).values.to(layer.bias.dtype)
            _reset_state(optimizer, layer.bias, units)
            done[names[layer]] = len(units)
            continue
        # 2. re-draw the incoming weights as PyTorch's default init does, zero the bias
        fresh = torch.empty_like(layer.weight)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        layer.weight[units] = fresh[units]
        _reset_state(optimizer, layer.weight, units)
        if layer.bias is not None:
            layer.bias[units] = 0
            _reset_state(optimizer, layer.bias, units)
        done[names[layer]] = len(units)
    # 3. last, so that a re-drawn row of a recycled consumer cannot bring an outgoing weight back
    for nxt, units in outgoing_to_zero:
        nxt.weight[:, units] = 0
        _reset_state(optimizer, nxt.weight, (slice(None), units))
    return done


class RestartOnVanishing:
    """Re-initialise the model after ``patience`` consecutive reports with vanishing gradients."""

    def __init__(self, model: nn.Module, patience: int = 3, inputs: Any = None):
        if not isinstance(patience, int) or patience < 1:
            raise bad_argument("patience", "a positive int", patience)
        self.model = model
        self.patience = patience
        self.inputs = inputs
        self.streak = 0
        self.restarts = 0

    def update(self, report: Any) -> bool:
        """Feed a Report; returns True when it restarted the model (rebuild the optimizer then)."""
        vanishing = any(f.kind == "vanishing_gradients" and f.severity != "info" for f in report.findings)
        self.streak = self.streak + 1 if vanishing else 0
        if self.streak < self.patience:
            return False
        relu = report.context.relu and not report.context.saturating
        try:
            (he_ if relu else xavier_)(self.model, self.inputs)
        except Exception as error:
            raise GradmedicError(
                f"RestartOnVanishing could not re-initialise the model ({first_line(error)}).") from error
        self.streak = 0
        self.restarts += 1
        return True
