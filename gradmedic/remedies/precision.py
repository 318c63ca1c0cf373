"""Loss scaling for float16 training, on ``torch.amp.GradScaler``, with unscaling before clipping.

Float16's smallest subnormal is 6e-8; activation gradients below it flush to zero (Micikevicius et al.
2018 found most of an fp16 SSD's activation gradients below 2^-24). Scaling the loss by S before the
backward shifts every gradient up by S; the optimizer step then sees them divided by S again, and a
step whose gradients overflowed is skipped while S shrinks. Clipping must see the *unscaled* gradients,
so ``ScaledStep`` unscales first and clips second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from gradmedic._errors import bad_argument

__all__ = ["ScaledStep"]


class ScaledStep:
    """``step(loss)``: scaled backward, unscale, optional clipping, optimizer step, scale update.

    >>> stepper = ScaledStep(optimizer, clip=lambda params: clip_(params, "norm", max_norm=1.0))
    >>> stepper.step(loss)   # instead of loss.backward(); optimizer.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip: Callable[[Iterable[torch.Tensor]], object] | None = None,
                 init_scale: float = 2.0**16, device: str | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise bad_argument("optimizer", "a torch.optim.Optimizer", optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            raise bad_argument("optimizer", "an optimizer with parameters", optimizer)
        low = [p.dtype for p in params if p.dtype in (torch.float16, torch.bfloat16)]
        if low:
            raise bad_argument("optimizer", "an optimizer over float32 (master) parameters", low[0],
                               "Keep weights in float32 and run the forward under torch.autocast(dtype=torch.float16).")
        self.optimizer = optimizer
        self.clip = clip
        self.scaler = torch.amp.GradScaler(device or params[0].device.type, init_scale=init_scale)

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale())

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, loss: torch.Tensor | None = None) -> None:
        """Backward (if ``loss`` is given), unscale, clip, step, update the scale, zero the gradients."""
        if loss is not None:
            self.backward(loss)
        self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            self.clip([p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
