"""Judging a remedy for a finding from a training run by re-running the run: the run's recipe (optimizer class and
hyperparameters, lr schedule, clipping, precision, the batches in their order) on a copy, watched by a Monitor of
the trace's preset, for as many steps as the run took to fail; then the copy's own run is diagnosed.

A run that went bad in training was healthy at init, so a re-check at init passes any change (a post-LN BERT at lr
1e-2 without warmup had 74 weight tensors re-drawn and trained no better). Only the run shows whether a remedy
prevents the failure. The re-run starts from the model ``treat`` is given: the model as it was at step 0 (fresh
weights, which ``freshness`` reads as fresh) replays the run from its start; a trained model continues from where
it is, and where the untreated replay does not fail again, nothing can be judged (``treat`` says so).

A remedy of the recipe (warmup, a lower lr, clipping, loss scaling) acts here on top of the run's own: the
treatment's schedule multiplies the run's learning rate at each step (read from a scheduler on a stand-in optimizer
at lr 1), its clipping follows the run's, its GradScaler is used when the run trains in float16.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument, first_line
from gradmedic._inputs import forward_loss, split_inputs
from gradmedic._progress import progress
from gradmedic.diagnosis import Report, diagnose
from gradmedic.monitor import Monitor
from gradmedic.remedies.treatment import RECIPE_FIELDS
from gradmedic.remedies.verify import Evidence, better

__all__ = ["LEARNED", "PRECISIONS", "RECIPE_FIELDS", "RESCUED", "Replay", "judge", "learns", "make_replay",
           "recipe_state", "replay", "set_recipe_state"]

# The Treatment's fields a recipe action sets (RECIPE_FIELDS, from treatment.py): saved before a trial, put back
# after it unless it is kept.
PRECISIONS = {None: None, "float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The keep rule's bars (``judge``). A re-run "learns" when its loss at the end is at most 0.9x where it began: the bar
# of the corpus's stall detector (tests/training_runs.py, STALL_FRACTION; every healthy run there has halved its loss
# by step 100, the post-LN GPT without warmup stays above it at chance).
LEARNED = 0.9
START_STEPS = 5  # where a run began: the mean of its first 5 losses (one batch's loss jumps)
# "Clearly lower": issue 27's bar for a rescued run, the treated loss at the end at most 0.8x the untreated run's.
RESCUED = 0.8


@dataclass
class Replay:
    """The run's recipe, besides the model: what every re-run of one ``treat`` call trains with."""

    batches: list[tuple[Any, Any]]  # (inputs, targets) per step, in the run's order
    steps: int
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None  # the run's: optimizer -> an LR scheduler
    clip: float | None = None  # the run's clip_grad_norm_ max norm
    precision: str | None = None  # autocast dtype name ("float16", "bfloat16"), None for the weights' own
    scaler: bool = False  # the run used a GradScaler
    loss_fn: Callable | None = None
    preset: str = "standard"  # the Monitor preset the finding was read with
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def make_replay(report: Report, data: Iterable | None, steps: int | None, schedule: Callable | None,
                clip: float | None, precision: str | None, scaler: bool, loss_fn: Callable | None,
                seed: int) -> Replay:
    """The recipe from ``treat``'s arguments; the steps default to the length of the run the report was read from."""
    if data is None:
        raise bad_argument("data", "the run's batches (a list or DataLoader of (inputs, targets), in the run's order)",
                           data, "A finding from a training run is judged by re-running the run: pass data= and "
                                 "optimizer= (and schedule=, clip=, precision= as the run had them).")
    if precision not in PRECISIONS:
        raise bad_argument("precision", f"one of {sorted(k for k in PRECISIONS if k)} or None", precision)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise bad_argument("clip", "None or the run's positive clip_grad_norm_ max norm", clip)
    if schedule is not None and not callable(schedule):
        raise bad_argument("schedule", "a callable optimizer -> LR scheduler (e.g. lambda opt: LambdaLR(opt, f))",
                           schedule)
    trace = report.trace
    if steps is None:
        if trace is None or not len(trace.steps):
            raise bad_argument("steps", "the number of steps to re-run (the report has no trace to read it from)",
                               steps)
        loss_steps = trace.scalar("loss")[0].tolist() if "loss" in trace.scalar_names else []
        steps = int(max(trace.steps.max(), max(loss_steps, default=0))) + 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise bad_argument("steps", "a positive int (steps of the run to replay)", steps)
    batches: list[tuple[Any, Any]] = []
    for item in data:
        batches.append(tuple(item) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None))
        if len(batches) == steps:
            break
    if not batches:
        raise GradmedicError("Argument data should be an iterable of the run's batches, but it yielded none; pass a "
                             "DataLoader or a list of batches.")
    notes = [] if len(batches) == steps else [f"data held {len(batches)} batches for {steps} steps: cycled"]
    preset = (trace.meta.get("preset") if trace is not None else None) or "standard"
    return Replay(batches, steps, schedule, None if clip is None else float(clip), precision, scaler, loss_fn,
                  preset if preset != "custom" else "standard", seed, notes)


def _factors(schedule: Callable | None) -> Callable[[], float] | None:
    """The treatment's schedule as a factor per step: its scheduler on a stand-in optimizer at lr 1."""
    if schedule is None:
        return None
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = schedule(stand_in)

    def factor() -> float:
        value = stand_in.param_groups[0]["lr"]
        stand_in.step()  # no gradient: nothing moves; torch expects a step before its scheduler's
        scheduler.step()
        return value
    return factor


def replay(model: nn.Module, stage: str, run: Replay, treatment: Any) -> tuple[Evidence, Report]:
    """Train a copy of ``model`` with the run's recipe and the treatment's (lr, schedule, clipping, loss scaling, the
    optimizer's eps/beta2/decay groups, a z-loss, a precision in place of the run's); the copy's loss curve (the run's
    own loss, without a z-loss) and the diagnosis of its own monitored run. The model itself is not touched."""
    work = copy.deepcopy(model)
    work.train()
    torch.manual_seed(run.seed)
    optimizer = treatment.optimizer(work)  # the module: decay groups know its norms and embeddings
    scheduler = run.schedule(optimizer) if run.schedule is not None else None
    factor = _factors(treatment.schedule)
    device = next((p.device.type for p in work.parameters()), "cpu")
    dtype = PRECISIONS[treatment.precision or run.precision]
    loss_fn = treatment.loss_fn(run.loss_fn)  # the run's loss, with the recipe's z-loss when it has one
    scaler = torch.amp.GradScaler(device) if dtype is torch.float16 and (run.scaler or treatment.loss_scaling) \
        else None
    evidence = Evidence(stage)
    monitor = Monitor(work, optimizer, preset=run.preset, live=False, scaler=scaler)
    try:
        with progress(f"gm.treat: re-running the run, {stage}", run.steps) as bar:
            for step in range(run.steps):
                x, y = run.batches[step % len(run.batches)]
                args, kwargs = split_inputs(x)
                try:
                    with torch.autocast(device, dtype=dtype or torch.float16, enabled=dtype is not None):
                        loss, _ = forward_loss(work, args, kwargs, y, loss_fn)
                except GradmedicError as error:
                    raise GradmedicError(f"The re-run could not train the {stage} copy: {first_line(error)}") \
                        from error
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                own = getattr(loss_fn, "base", None)  # the run's own loss, what is compared, without the z-loss
                monitor.step(own if own is not None else loss)
                value = float((own if own is not None else loss).detach())
                evidence.losses.append(value if math.isfinite(value) else math.inf)
                if not math.isfinite(value):
                    break  # the failure happened: nothing after it is evidence
                params = [p for p in work.parameters() if p.grad is not None]
                if run.clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, run.clip)
                if treatment.clip is not None:
                    treatment.clip(params)
                base = [group["lr"] for group in optimizer.param_groups]
                if factor is not None:
                    scale = factor()
                    for group, lr in zip(optimizer.param_groups, base, strict=True):
                        group["lr"] = lr * scale
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                for group, lr in zip(optimizer.param_groups, base, strict=True):
                    group["lr"] = lr  # the run's own schedule goes on from its own value
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                bar.advance()
    finally:
        monitor.close()
    report = diagnose(monitor.trace)
    evidence.findings = [(f.kind, f.severity) for f in report.findings if f.severity != "info"]
    return evidence, report


def recipe_state(treatment: Any) -> dict[str, Any]:
    return {name: getattr(treatment, name) for name in RECIPE_FIELDS}


def set_recipe_state(treatment: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(treatment, name, value)


def _severity(report: Report, kind: str) -> int:
    """The worst severity of ``kind`` in ``report`` (-1: absent, 0 info, 1 warning, 2 error)."""
    return max((f.rank for f in report.findings if f.kind == kind), default=-1)


def _burden(report: Report, besides: str) -> tuple[int, int]:
    rest = [f for f in report.findings if f.kind != besides]
    return sum(f.severity == "error" for f in rest), sum(f.severity == "warning" for f in rest)


def _new(before: Report, after: Report, severity: str) -> set[str]:
    """The kinds at ``severity`` in ``after`` that ``before`` did not have at that severity or worse."""
    rank = ("info", "warning", "error").index(severity)
    return {f.kind for f in after.findings if f.severity == severity} - \
        {f.kind for f in before.findings if f.rank >= rank}


def learns(evidence: Evidence) -> bool:
    """Does the re-run learn: is its loss at the end (``Evidence.score``) at most ``LEARNED`` of where it began (the
    mean of its first ``START_STEPS`` losses)?"""
    start = evidence.losses[:START_STEPS]
    return bool(start) and all(math.isfinite(v) for v in start) and math.isfinite(evidence.score) and \
        evidence.score <= LEARNED * sum(start) / len(start)


def judge(kind: str, before: Report, after: Report, evidence: Evidence,
          reference: Evidence) -> tuple[bool, bool, tuple, str]:
    """(kept, clears, key, why) of a trial's re-run against the run it would replace (``before``, ``reference``).

    Kept when all hold: the re-run stays finite; ``kind`` is no worse; no kind is newly an error (an error is a
    failure the run did not have); the loss is no higher, and either ``kind`` went down or the loss fell by
    ``VERIFY_MARGIN`` (a change that does nothing is not a remedy); and a kind newly a warning (or more warnings or
    errors of the other kinds) only when the run now learns and its loss is clearly lower (``learns``, at most
    ``RESCUED`` of the reference's). A run that learns shows what a run that never left its start cannot: a post-LN
    GPT given warmup learns the copy task and its attention logits then grow, a warning; refusing the warmup for it
    kept the run at chance. A learning rate so low that the finding goes because nothing moves shows up as stalled
    updates without learning: still refused. Clears: ``kind`` is gone or only info. Key (lower is better): the
    kind's severity, then the loss."""
    was, now = _severity(before, kind), _severity(after, kind)
    finite = bool(evidence.losses) and all(math.isfinite(v) for v in evidence.losses)
    lower = not math.isfinite(reference.score) or evidence.score <= reference.score
    errors = _new(before, after, "error") - {kind}
    warnings = _new(before, after, "warning") - {kind}
    more = _burden(after, kind) > _burden(before, kind)
    rescued = learns(evidence) and (not math.isfinite(reference.score) or evidence.score <= RESCUED * reference.score)
    tolerated = not (warnings or more) or rescued
    kept = finite and now <= was and not errors and lower and tolerated and (now < was or better(evidence, reference))
    if not finite:
        state = "a non-finite loss"
    elif errors:
        state = "new error(s): " + ", ".join(sorted(errors))
    elif not tolerated:
        state = f"new or more findings ({', '.join(sorted(warnings)) or 'more of the same'}) and the run " + \
            ("does not learn" if not learns(evidence) else f"not clearly better (loss {evidence.score:.4g} against "
                                                            f"{reference.score:.4g})")
    else:
        state = f"{kind} {'gone' if now < 0 else ('info', 'warning', 'error')[now]}, loss {evidence.score:.4g} " \
                f"against {reference.score:.4g}" + (f"; new warning(s) {', '.join(sorted(warnings))} in a run that "
                                                     "now learns" if warnings and kept else "")
    return kept, kept and now <= 0, (now, evidence.score), state
