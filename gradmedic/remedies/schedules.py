"""Learning-rate schedules on torch's own schedulers: warm restarts (SGDR) and step/exponential decay.

``warm_restarts`` is cosine annealing restarted every ``period`` steps, the period multiplied by ``mult``
after each restart (Loshchilov & Hutter 2017); the jump back to the base rate helps a run escape a stall.
``linear_warmup`` ramps the rate from ``1/steps`` of its value to all of it over ``steps`` steps: what a
post-LN transformer needs to train at all (Vaswani et al. 2017; Xiong et al. 2020).
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from gradmedic._errors import bad_argument

__all__ = ["exponential_decay", "linear_warmup", "step_decay", "warm_restarts"]


def _check_optimizer(optimizer: object) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise bad_argument("optimizer", "a torch.optim.Optimizer", optimizer)


def warm_restarts(optimizer: torch.optim.Optimizer, period: int = 100, mult: int = 1,
                  min_lr: float = 0.0) -> lr_scheduler.CosineAnnealingWarmRestarts:
    """SGDR: call ``scheduler.step()`` once per optimizer step."""
    _check_optimizer(optimizer)
    if not isinstance(period, int) or period < 1:
        raise bad_argument("period", "a positive int (steps to the first restart)", period)
    if not isinstance(mult, int) or mult < 1:
        raise bad_argument("mult", "a positive int (period growth after each restart)", mult)
    return lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period, T_mult=mult, eta_min=min_lr)


def step_decay(optimizer: torch.optim.Optimizer, every: int = 100, factor: float = 0.1) -> lr_scheduler.StepLR:
    """Multiply the learning rate by ``factor`` every ``every`` steps."""
    _check_optimizer(optimizer)
    if not isinstance(every, int) or every < 1 or not 0 < factor <= 1:
        raise bad_argument("every and factor", "a positive int and a factor in (0, 1]", (every, factor))
    return lr_scheduler.StepLR(optimizer, step_size=every, gamma=factor)


def exponential_decay(optimizer: torch.optim.Optimizer, factor: float = 0.99) -> lr_scheduler.ExponentialLR:
    """Multiply the learning rate by ``factor`` at every step."""
    _check_optimizer(optimizer)
    if not 0 < factor <= 1:
        raise bad_argument("factor", "a float in (0, 1]", factor)
    return lr_scheduler.ExponentialLR(optimizer, gamma=factor)


def linear_warmup(optimizer: torch.optim.Optimizer, steps: int = 100) -> lr_scheduler.LambdaLR:
    """Learning rate times (k + 1) / ``steps`` at step k, then constant."""
    _check_optimizer(optimizer)
    if not isinstance(steps, int) or steps < 1:
        raise bad_argument("steps", "a positive int (steps to reach the full learning rate)", steps)
    return lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / steps))
