"""A friendly finite-difference check of a module's (or a function's) backward, in float64.

``torch.autograd.gradcheck`` decides pass or fail for each input and parameter, taken one at a time (the
others held fixed), so a failure names *which* tensor's gradient is wrong. For a failing tensor, the
analytical Jacobian (from autograd) is compared with a central-difference one to say by how much.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument

__all__ = ["GradcheckResult", "gradcheck"]


@dataclass
class GradcheckResult:
    ok: bool
    checked: list[str]
    # name -> {"max_abs_error", "max_rel_error", "analytical_norm", "numerical_norm"}
    mismatches: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.ok:
            return f"gradcheck passed for {len(self.checked)} tensor(s): {', '.join(self.checked)}"
        lines = [f"gradcheck FAILED for {', '.join(self.mismatches)}:"]
        for name, m in self.mismatches.items():
            lines.append(f"  {name}: max |analytical - numerical| = {m['max_abs_error']:.3e} "
                         f"(relative {m['max_rel_error']:.3e})")
        return "\n".join(lines)


def _jacobians(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    analytical = torch.autograd.functional.jacobian(fn, x).reshape(-1, x.numel())
    numerical = torch.zeros_like(analytical)
    flat = x.detach().clone().reshape(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        with torch.no_grad():
            diff = fn(plus.reshape(x.shape)) - fn(minus.reshape(x.shape))
        numerical[:, i] = diff.reshape(-1) / (2 * eps)
    return analytical, numerical


def gradcheck(fn: nn.Module | Callable[..., torch.Tensor], *inputs: torch.Tensor, eps: float = 1e-6,
              atol: float = 1e-5, rtol: float = 1e-3, check_params: bool = True) -> GradcheckResult:
    """Check ``fn(*inputs)``'s backward for each floating input and (for a module) each parameter.

    Works on float64 copies; the module and inputs given are not changed.
    """
    if not callable(fn):
        raise bad_argument("fn", "an nn.Module or a function of tensors", fn)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise bad_argument("inputs", "one or more tensors", inputs)
    module = copy.deepcopy(fn).double() if isinstance(fn, nn.Module) else None
    call = module if module is not None else fn
    xs = [x.detach().double() if x.is_floating_point() else x for x in inputs]

    def first_tensor(out: Any) -> torch.Tensor:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(out, torch.Tensor):
            raise GradmedicError(f"gradcheck needs a tensor output, but fn returned {type(out).__name__}.")
        return out

    targets: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = []
    for i, x in enumerate(xs):
        if not x.is_floating_point():
            continue

        def of_input(t: torch.Tensor, i: int = i) -> torch.Tensor:
            args = list(xs)
            args[i] = t
            return first_tensor(call(*args))

        targets.append((f"input {i}", of_input, x))
    if module is not None and check_params:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue

            def of_param(t: torch.Tensor, name: str = name) -> torch.Tensor:
                return first_tensor(torch.func.functional_call(module, {name: t}, tuple(xs)))

            targets.append((f"parameter {name}", of_param, p.detach()))
    if not targets:
        raise GradmedicError("gradcheck found no floating-point input or parameter to check.")
    result = GradcheckResult(ok=True, checked=[name for name, _, _ in targets])
    for name, f, x in targets:
        x = x.clone().requires_grad_(True)
        passed = torch.autograd.gradcheck(f, (x,), eps=eps, atol=atol, rtol=rtol, raise_exception=False)
        if passed:
            continue
        analytical, numerical = _jacobians(f, x.detach(), eps)
        err = (analytical - numerical).abs()
        result.ok = False
        result.mismatches[name] = {
            "max_abs_error": float(err.max()),
            "max_rel_error": float((err / numerical.abs().clamp_min(atol)).max()),
            "analytical_norm": float(analytical.norm()),
            "numerical_norm": float(numerical.norm()),
        }
    return result
