"""The rescue of a corpus run (issue 27): its Monitor's findings, and ``gm.treat``'s arguments that re-run it (the model
as it was at step 0, the run's batches in order, its optimizer, schedule, clipping and precision)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

import gradmedic as gm
from tests import training_runs as corpus

RESCUED = 0.8  # issue 27: the treated run's loss at the end is at most 0.8x the untreated run's
TAIL = 0.2  # the loss "at the end": the mean over the last fifth of the steps (a single batch's loss jumps)


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


def end(losses: list[float]) -> float:
    """The loss at the end: the mean of the last fifth of the steps (inf when one of them is not finite)."""
    tail = losses[-max(1, int(len(losses) * TAIL)):]
    return math.inf if not tail or not all(math.isfinite(v) for v in tail) else sum(tail) / len(tail)


@dataclasses.dataclass(frozen=True)
class Treated(corpus.Recipe):
    """A corpus recipe with the treatment's: its learning rate also multiplied by the treatment's linear warmup, as
    treat's re-run applies it on top of the run's own schedule (a run warmed up already, GPT_HOT's 300 steps,
    included), and its optimizer (class, eps, betas, decay groups) in place of the recipe's; the corpus loop still
    sets every group's learning rate from the recipe at each step."""

    extra_warmup: int = 0
    build: Callable[[], torch.optim.Optimizer] | None = None

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.extra_warmup) if self.extra_warmup else 1.0
        return super().lr_at(step) * warm

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return self.build() if self.build is not None else super().make_optimizer(params)


def recipe_of(r: corpus.Run, treatment: gm.Treatment) -> Treated:
    """The corpus recipe with the treatment's recipe changes, for the corpus's own trainer."""
    rec = r.recipe
    clip = rec.clip
    if treatment.clip is not None:
        clip = min(clip or math.inf, treatment.clip.keywords["max_norm"])
    fields = dict(lr=treatment.lr, clip=clip, precision="fp16_scaler" if treatment.loss_scaling else rec.precision,
                  build=lambda: treatment.optimizer(treatment.model))
    if treatment.schedule is not None:
        assert treatment.schedule.func.__name__ == "linear_warmup", treatment.schedule
        fields["extra_warmup"] = treatment.schedule.keywords["steps"]
    return Treated(**{**{f.name: getattr(rec, f.name) for f in dataclasses.fields(corpus.Recipe)}, **fields})


def replayed(r: corpus.Run, treatment: gm.Treatment) -> corpus.Result:
    """The treated model trained by the corpus's own trainer with the treatment's recipe (not gradmedic's re-run):
    its optimizer, lr, warmup, clipping, loss scaling, and its z-loss added to the task's loss for training while the
    losses kept are the task's own (what is compared). The detectors that read the model's architecture (the
    dead-unit probe loads the state into an untreated twin) are left out when the treatment changed the
    architecture."""
    same = treatment.model.state_dict().keys() == step0(r).state_dict().keys()
    detectors = r.detectors if same else tuple(d for d in r.detectors if d != "dead_units")
    rerun = dataclasses.replace(r, recipe=recipe_of(r, treatment), detectors=detectors)
    if not treatment.z_loss:
        return corpus.run(rerun, model=treatment.model)
    task_class = type(corpus.build(r)[1])
    task_loss, own_attr = task_class.loss, task_class.__dict__.get("loss")
    own: list[float] = []

    def loss(task, out, y):
        base = task_loss(task, out, y)
        own.append(float(base.detach()))
        return base + gm.remedies.z_loss(out, treatment.z_loss)
    task_class.loss = loss
    try:
        result = corpus.run(rerun, model=treatment.model)
    finally:  # as it was: the class's own loss, or none (inherited)
        if own_attr is None:
            del task_class.loss
        else:
            task_class.loss = own_attr
    return dataclasses.replace(result, losses=own)
