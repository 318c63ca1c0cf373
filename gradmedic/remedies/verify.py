"""Proof by training: the same recipe, seed and batches for the untreated copy and each treated stage.

``treat(..., verify_steps=N)`` trains a copy of the model before a remedy and a copy after it for N steps
(the caller's optimizer class and hyperparameters, else Adam at the treatment's learning rate; its
clipping and schedule; ``torch.manual_seed(seed)`` before each run so dropout draws the same) on the
user's batch repeated, or on the first N batches of ``data`` (cycled). A remedy is kept only when its
score, the mean loss over the last fifth of the steps, is lower by ``VERIFY_MARGIN``. When the loss
cannot be compared (no targets, no loss function, no ``.loss``: the check's random projection is not a
training objective), the re-checked gradient profile alone decides (treat says so).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, first_line
from gradmedic._inputs import forward_loss, run_forward, split_inputs
from gradmedic._progress import progress

__all__ = ["VERIFY_MARGIN", "Evidence", "better", "loss_comparable", "loss_curve"]

# A remedy must lower the score by 2%: the same model, seed and batches give the same loss to the last
# bit, so 2% is not noise but a real (if modest) gain; smaller gains are not worth a change to the model.
VERIFY_MARGIN = 0.02
# The score: mean loss over the last fifth of the steps (a single last loss jumps with the batch).
SCORE_FRACTION = 0.2


@dataclass
class Evidence:
    """One training run of the verification: which stage, its loss curve, its score, kept or not."""

    stage: str  # "untreated" or the remedy id tried
    losses: list[float] = field(default_factory=list)
    kept: bool = False  # the untreated run, and each remedy that treat kept
    # a re-run's own diagnosis, (kind, severity) of each warning or error: why a trial was kept or refused
    findings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def score(self) -> float:
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, int(len(self.losses) * SCORE_FRACTION)):]
        return math.inf if not all(math.isfinite(v) for v in tail) else sum(tail) / len(tail)


def better(new: Evidence, old: Evidence) -> bool:
    """Is ``new`` lower than ``old`` by the margin (any finite score beats a non-finite one)?"""
    if not math.isfinite(new.score):
        return False
    return not math.isfinite(old.score) or new.score < old.score * (1 - VERIFY_MARGIN)


@torch.no_grad()
def loss_comparable(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable | None,
                    data: Iterable | None) -> bool:
    """Is there a training objective (a loss function, targets, or a ``.loss`` in the outputs)? Without one
    the check falls back to a random projection of the outputs, whose value says nothing about learning."""
    if loss_fn is not None or targets is not None:
        return True
    if data is not None:
        return True  # batches of (inputs, targets), or inputs whose outputs carry a loss: the loss decides
    outputs = run_forward(copy.deepcopy(model).eval(), inputs)
    return getattr(outputs, "loss", None) is not None or (isinstance(outputs, dict) and outputs.get("loss") is not None)


def _batches(inputs: Any, targets: Any, data: Iterable | None, steps: int) -> list[tuple[Any, Any]]:
    if data is None:
        return [(inputs, targets)] * steps
    batches: list[tuple[Any, Any]] = []
    for item in data:
        batches.append(tuple(item) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None))
        if len(batches) == steps:
            break
    if not batches:
        raise GradmedicError("Argument data should be an iterable of batches ((inputs, targets) or inputs), but it "
                             "yielded none; pass a DataLoader or a list of batches.")
    return [batches[i % len(batches)] for i in range(steps)]


def loss_curve(model: nn.Module, stage: str, inputs: Any, targets: Any, loss_fn: Callable | None,
               data: Iterable | None, steps: int, seed: int,
               make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], clip: Callable | None = None,
               schedule: Callable | None = None) -> Evidence:
    """Train a copy of ``model`` for ``steps`` steps; the model itself is not touched."""
    work = copy.deepcopy(model)
    work.train()
    torch.manual_seed(seed)
    optimizer = make_optimizer(work)
    scheduler = schedule(optimizer) if schedule is not None else None
    evidence = Evidence(stage)
    with progress(f"gm.treat: verifying {stage}", steps) as bar:
        for x, y in _batches(inputs, targets, data, steps):
            args, kwargs = split_inputs(x)
            try:
                loss, _ = forward_loss(work, args, kwargs, y, loss_fn)
            except GradmedicError as error:
                raise GradmedicError(f"Verification could not train the {stage} copy: {first_line(error)}") from error
            if not torch.isfinite(loss):
                evidence.losses.append(math.inf)
                break
            loss.backward()
            if clip is not None:
                clip([p for p in work.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            evidence.losses.append(float(loss.detach()))
            bar.advance()
    return evidence
