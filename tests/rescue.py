"""The rescue of a corpus run (issue 27): its Monitor's findings, and ``gm.treat``'s arguments that re-run it (the model
as it was at step 0, the run's batches in order, its optimizer, schedule, clipping and precision)."""

from __future__ import annotations

import functools
from typing import Any

import torch

import gradmedic as gm
from tests import training_runs as corpus


def watched(r: corpus.Run) -> tuple[corpus.Result, gm.Report]:
    """The run as the corpus trains it, watched by a default-preset Monitor: its result and its diagnosis."""
    model, _ = corpus.build(r)
    monitor: dict[str, Any] = {}

    def on_step(step, m, optimizer, loss):
        if "m" not in monitor:
            monitor["m"] = gm.Monitor(m, optimizer, live=False)
        monitor["m"].step(loss)

    result = corpus.run(r, on_step, model=model)
    monitor["m"].close()
    return result, monitor["m"].diagnose()


def batches(r: corpus.Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's batches in its order, the bad one included (drawn as ``corpus.run`` draws them)."""
    _, task = corpus.build(r)
    out = []
    for step in range(r.recipe.steps):
        x, y = task.batch()
        if r.fault is not None and step == r.fault[0]:
            x, y = corpus._corrupt(r, x, y)
        out.append((x, y))
    return out


def treat_args(r: corpus.Run) -> dict[str, Any]:
    """``gm.treat``'s keyword arguments for re-running ``r``: everything but the model and the report."""
    rec = r.recipe
    model, task = corpus.build(r)
    optimizer = getattr(torch.optim, rec.optimizer)(model.parameters(), lr=rec.lr, **dict(rec.optimizer_kwargs))
    schedule = None
    if rec.warmup or rec.schedule != "constant" or rec.lr_spike:
        schedule = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: rec.lr_at(s) / rec.lr)
    return dict(data=batches(r), optimizer=optimizer, schedule=schedule, clip=rec.clip, loss_fn=task.loss,
                precision=None if rec.precision == "fp32" else "float16", scaler=rec.precision == "fp16_scaler")


def step0(r: corpus.Run) -> torch.nn.Module:
    return corpus.build(r)[0]
