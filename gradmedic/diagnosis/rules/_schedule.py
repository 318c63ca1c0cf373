"""What the learning-rate schedule did before a loss went bad: a spike or a divergence that follows a jump of the lr
(a restart gone wrong, a schedule with a bug, a resumed run with the wrong lr) is the lr's, and the remedy is the lr,
not a warmup or clipping. The Monitor records the lr at every step (run scalar ``lr``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import scalar_in_order
from gradmedic.trace import Trace

__all__ = ["LR_JUMP", "after_lr_jump"]

# A jump: the lr at least doubled within LR_JUMP_STEPS steps. A linear warmup over W steps doubles within 5 steps only
# in its first 10 (lr(t) / lr(t - 5) = t / (t - 5)), before any loss rule has history enough to judge; a cosine or step
# decay never rises. 2x is where Wortsman et al. 2023 (fig. 1) see the loss of a small transformer go from stable to
# diverging as the lr grows.
LR_JUMP = 2.0
LR_JUMP_STEPS = 5
# ...and close enough before the loss went bad to be its cause: within the loss-spike rule's rolling window.
LR_JUMP_BEFORE = 50


def _lr_jump(trace: Trace, step: int) -> tuple[float, int] | None:
    """(how many times the lr rose, the step it rose at) for the largest jump in the LR_JUMP_BEFORE steps up to
    ``step``, or None."""
    read = scalar_in_order(trace, "lr")
    if read is None:
        return None
    steps, lr = read
    if lr.size <= LR_JUMP_STEPS:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = lr[LR_JUMP_STEPS:] / lr[:-LR_JUMP_STEPS]
    at = steps[LR_JUMP_STEPS:]
    near = (at <= step) & (at > step - LR_JUMP_BEFORE) & np.isfinite(ratio) & (lr[:-LR_JUMP_STEPS] > 0)
    if not near.any() or ratio[near].max() < LR_JUMP:
        return None
    i = int(np.flatnonzero(near)[np.argmax(ratio[near])])
    rose = i + int(np.flatnonzero(lr[i:i + LR_JUMP_STEPS + 1] > lr[i])[0])  # the first step above where it rose from
    return float(ratio[i]), int(steps[rose])


def after_lr_jump(found: Finding, trace: Trace, step: int) -> Finding:
    """``found`` (a spike or a divergence that began at ``step``), or, where the lr jumped just before, the same
    finding saying so with lowering the lr first."""
    jump = _lr_jump(trace, step)
    if jump is None:
        return found
    factor, at = jump
    remedies = ["lower_learning_rate"] + [r for r in found.remedies if r not in ("lower_learning_rate", "lr_warmup")]
    return dataclasses.replace(
        found, message=f"{found.message} The learning rate rose x{factor:.3g} at step {at}, just before: the schedule "
        "(or whatever set it) drove the loss up; bring it back down.", remedies=remedies,
        evidence={**found.evidence, "lr_jump": factor, "lr_jump_step": at})
