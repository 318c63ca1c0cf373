"""Gradient clipping behind one front door, ``clip_(parameters, mode=...)``, shaped like torch.nn.utils.

- ``"value"``: each entry to [-clip_value, clip_value] (``torch.nn.utils.clip_grad_value_``).
- ``"norm"``: the global norm to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``; Pascanu et al. 2013).
- ``"autoclip"``: the global norm to the ``percentile``-th percentile of the history of global norms seen
  so far, this step's included (AutoClip, Seetharaman et al. 2020; p = 10 by default).
- ``"agc"``: unit-wise, each output unit's gradient to ``clip_factor * max(||w_i||, eps)``
  (adaptive gradient clipping, Brock et al. 2021; lambda = 0.01, eps = 1e-3). Units are rows of a
  weight (all dimensions but the first); a 0- or 1-d tensor (a bias, a gain) is one unit.

All accept a tensor or an iterable of tensors, skip parameters whose ``grad`` is None, work in place and
return the global gradient norm measured before clipping.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from gradmedic._errors import bad_argument

__all__ = ["MODES", "AutoClip", "adaptive_clip_grad_", "clip_"]

MODES = ("value", "norm", "autoclip", "agc")


def _with_grads(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    for p in params:
        if not p.grad.is_floating_point():
            raise bad_argument("parameters", "parameters with floating-point gradients", p.grad.dtype)
    return params


def _global_norm(params: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    if not params:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)


def _unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-unit 2-norms, shaped to broadcast against ``t``."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


def adaptive_clip_grad_(parameters: torch.Tensor | Iterable[torch.Tensor], clip_factor: float = 0.01,
                        eps: float = 1e-3) -> torch.Tensor:
    """AGC: scale each unit's gradient down to at most ``clip_factor * max(||w_i||, eps)``."""
    if clip_factor <= 0 or eps <= 0:
        raise bad_argument("clip_factor and eps", "positive floats", (clip_factor, eps))
    params = _with_grads(parameters)
    total = _global_norm(params)
    with torch.no_grad():
        for p in params:
            max_norm = _unitwise_norm(p.detach()).clamp_min(eps) * clip_factor
            grad_norm = _unitwise_norm(p.grad)
            scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
            p.grad.mul_(scale)
    return total


class AutoClip:
    """Clip the global norm to a percentile of its own history (AutoClip); keeps the history."""

    def __init__(self, percentile: float = 10.0, history: int | None = None):
        if not 0 < percentile <= 100:
            raise bad_argument("percentile", "a number in (0, 100]", percentile)
        if history is not None and history < 1:
            raise bad_argument("history", "a positive int or None (keep everything)", history)
        self.percentile = percentile
        self.history = history
        self.norms: list[float] = []

    def threshold(self) -> float:
        return float(np.percentile(self.norms, self.percentile))

    def __call__(self, parameters: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
        params = _with_grads(parameters)
        total = _global_norm(params)
        self.norms.append(float(total))  # a host read per step: AutoClip needs the value on the host
        if self.history is not None:
            del self.norms[:-self.history]
        torch.nn.utils.clip_grads_with_norm_([p for p in params], self.threshold(), total)
        return total


def clip_(parameters: torch.Tensor | Iterable[torch.Tensor], mode: str = "norm", *, max_norm: float = 1.0,
          clip_value: float = 1.0, norm_type: float = 2.0, clip_factor: float = 0.01, eps: float = 1e-3,
          autoclip: AutoClip | None = None) -> torch.Tensor:
    """Clip gradients in place; returns the global gradient norm before clipping.

    ``mode="autoclip"`` needs the ``AutoClip`` that holds the history (one per training run).
    """
    if mode not in MODES:
        raise bad_argument("mode", f"one of {MODES}", mode)
    params = _with_grads(parameters)
    if mode == "norm":
        if max_norm <= 0:
            raise bad_argument("max_norm", "a positive float", max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type) if params else torch.zeros(())
    if mode == "value":
        if clip_value <= 0:
            raise bad_argument("clip_value", "a positive float", clip_value)
        total = _global_norm(params, norm_type)
        torch.nn.utils.clip_grad_value_(params, clip_value)
        return total
    if mode == "agc":
        return adaptive_clip_grad_(params, clip_factor=clip_factor, eps=eps)
    if autoclip is None:
        raise bad_argument("autoclip", "an AutoClip instance (it keeps the history of norms)", autoclip,
                           "Create one per run: clipper = AutoClip(percentile=10).")
    return autoclip(params)
