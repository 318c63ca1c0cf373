"""``gm.treat``: one remedy at a time, the least invasive that works, proven where it can be, never harmful.

1. The worst finding (warning or error) is taken first. Its prescribed model-side remedies are tried on a
   copy, least invasive first (``actions.TIERS``: a scale, then an init, reviving units, inserting layers,
   replacing them), ties in the diagnosis's rank. With ``inputs`` the trial is checked again and kept only
   when the report got better (fewer errors, else fewer warnings) and, with ``verify_steps``, when N
   training steps prove it (``verify.py``). Then the next remaining finding; a finding an earlier remedy
   fixed gets nothing. Without ``inputs`` the best applicable remedy of the worst finding is applied
   unchecked, and the treatment says so.
2. Trained weights are kept. ``trained=None`` infers fresh weights from their statistics
   (``freshness.py``) and takes the safe side (trained) when it cannot tell. On trained weights only
   actions with a function-preserving form run (LayerScale at 1, reviving units without re-drawing,
   recipe changes); the others go to ``Treatment.advice``. Every re-drawn or rescaled tensor is counted.
3. Training-side remedies (clipping, learning rate, warmup, loss scaling) become a recipe of ready objects
   for the findings that remain, since they act on the user's loop, not on the model.
4. A finding from a training run (``order.from_run``: a Monitor's or a callback's trace) is judged the way it was
   found: each trial, recipe changes included, re-runs the run's recipe (``data``, ``optimizer``, ``schedule``,
   ``clip``, ``precision``; ``rerun.py``) from the model given, for the run's length, and is kept only when its own
   monitored run has the finding gone or less severe (or the loss lower), no worse, no kind newly an error, and no
   non-finite loss; a new warning only when the run now learns and its loss is clearly lower (``rerun.judge``). A
   re-check at init would pass anything: the untreated model was healthy there. A run's finding that no re-run
   can judge (no data, or trained weights: the re-run goes on from them and cannot replay the run's start) gets
   its prescription unproven, said so: the recipe, and the model changes as advice (``prescribe.py``).

The caller's torch, numpy and Python RNG states are as they were; re-draws use ``seed``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic._inputs import optimizer_defaults, rebuild_optimizer
from gradmedic.check import check
from gradmedic.diagnosis import Finding, Report
from gradmedic.remedies.actions import ACTIONS, Patient
from gradmedic.remedies.freshness import freshness
from gradmedic.remedies.order import from_run, remedy_order
from gradmedic.remedies.prescribe import advise, prescribe_unjudged, recipe, why
from gradmedic.remedies.rerun import Replay, judge, make_replay, recipe_state, replay, set_recipe_state
from gradmedic.remedies.treatment import Treatment, trial_order
from gradmedic.remedies.verify import Evidence, better, loss_comparable, loss_curve

__all__ = ["Treatment", "treat", "trial_order"]


@contextlib.contextmanager
def _caller_rng_kept(seed: int, model: nn.Module) -> Iterator[None]:
    """The caller's torch (CPU and the model's CUDA devices), numpy and Python RNGs are restored after."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _burden(report: Report) -> tuple[int, int]:
    return (sum(f.severity == "error" for f in report.findings), sum(f.severity == "warning" for f in report.findings))


def _candidates(finding: Finding, report: Report, model: nn.Module, course: _Course,
                treatment: Treatment) -> list[str]:
    """``order.remedy_order`` on this model's module classes: what cannot apply is recorded, not tried."""
    types = {name: type(module).__name__ for name, module in model.named_modules()}
    order, left_out = remedy_order(finding, report, run=course.replay is not None, types=types)
    advise(treatment, finding)  # the remedies no action carries out: a change to the model's code
    for rid, reason in left_out.items():
        if rid not in dict(treatment.skipped):
            treatment.skipped.append((rid, reason))
    return order


def _changed(before: dict[int, torch.Tensor], model: nn.Module) -> int:
    """How many of the tensors that existed before now hold other values."""
    return sum(1 for p in model.parameters() if id(p) in before and
               (p.shape != before[id(p)].shape or not torch.equal(p.detach(), before[id(p)])))


def treat(model: nn.Module, report: Report, inputs: Any = None, targets: Any = None,
          loss_fn: Callable | None = None, trained: bool | None = None, verify_steps: int = 0,
          data: Iterable | None = None, optimizer: torch.optim.Optimizer | None = None, max_remedies: int = 3,
          seed: int = 0, max_rounds: int | None = None, steps: int | None = None,
          schedule: Callable[[torch.optim.Optimizer], Any] | None = None, clip: float | None = None,
          precision: str | None = None, scaler: bool = False) -> Treatment:
    """Treat a copy of ``model`` for the report's findings; see the module docstring.

    Each trial is judged the way the report was made: a report from ``gm.check(..., steps=N, optimizer=opt)`` is
    re-checked with N steps of ``optimizer`` (pass the same one here). A report from a run (``gm.diagnose`` of a
    Monitor's or a callback's trace) is judged by re-running the run: pass ``model`` as it was at step 0, ``data``
    (the run's batches in order), ``optimizer`` (its class and hyperparameters are taken, not its state), and as
    the run had them ``schedule`` (optimizer -> LR scheduler), ``clip`` (clip_grad_norm_'s max norm),
    ``precision`` ("float16"/"bfloat16" autocast) and ``scaler`` (a GradScaler); ``steps`` defaults to the
    trace's length. ``max_rounds`` is the former name of ``max_remedies``."""
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    if not isinstance(report, Report):
        raise bad_argument("report", "a gradmedic Report (from gm.check or gm.diagnose)", report)
    if max_rounds is not None:
        max_remedies = max_rounds
    if not isinstance(max_remedies, int) or isinstance(max_remedies, bool) or max_remedies < 1:
        raise bad_argument("max_rounds" if max_rounds is not None else "max_remedies", "a positive int", max_remedies)
    if trained not in (None, True, False):
        raise bad_argument("trained", "None (infer), True (keep the weights) or False (fresh weights)", trained)
    if not isinstance(verify_steps, int) or isinstance(verify_steps, bool) or verify_steps < 0:
        raise bad_argument("verify_steps", "a non-negative int (training steps to prove each remedy)", verify_steps)
    if verify_steps and inputs is None and data is None:
        raise bad_argument("verify_steps", "0 when neither inputs nor data is given", verify_steps,
                           "Pass inputs= (and targets=) or data= (an iterable of batches) to verify by training.")
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise bad_argument("model", "a model whose parameters are floating point", bad[0],
                           "treat re-initialises weights, which needs float parameters.")
    check_steps = int(((report.trace.meta if report.trace is not None else {}).get("check") or {}).get("steps", 0))
    course = _Course(inputs, targets, loss_fn, data, optimizer, verify_steps, seed, check_steps)
    if from_run(report) and any(f.severity != "info" for f in report.findings):  # nothing to treat: no re-run
        if data is None or optimizer is None:
            course.unjudged = ("a finding from a training run is judged by re-running the run: pass the model as it "
                               "was at step 0 with data= and optimizer= (schedule=, clip=, precision= as the run had "
                               "them); nothing was changed on the model")
        else:
            course.replay = make_replay(report, data, steps, schedule, clip, precision, scaler, loss_fn, seed)
            course.verify_steps = 0  # the re-run is the verification
    with _caller_rng_kept(seed, model):
        return _treat(model, report, course, trained, max_remedies)


@dataclass
class _Course:
    """What every trial of one ``treat`` call is judged with: the batch (or data), the loss, the caller's optimizer,
    how many steps the report's check trained (a trial is re-checked the same way) and how many prove a remedy."""

    inputs: Any
    targets: Any
    loss_fn: Callable | None
    data: Iterable | None
    optimizer: torch.optim.Optimizer | None
    verify_steps: int
    seed: int
    check_steps: int
    treatment: Treatment | None = None
    replay: Replay | None = None  # a run's finding: the run's recipe, which every trial re-runs
    unjudged: str = ""  # why a run's finding could not be judged (no data or optimizer)

    def rerun(self, trial: nn.Module, stage: str) -> tuple[Evidence, Report]:
        assert self.replay is not None and self.treatment is not None
        return replay(trial, stage, self.replay, self.treatment)

    def recheck(self, trial: nn.Module) -> Report:
        """The trial checked as the report was made (the caller's optimizer rebuilt over the trial's parameters)."""
        optimizer = rebuild_optimizer(self.optimizer, trial.parameters()) if self.optimizer is not None else None
        return check(trial, self.inputs, targets=self.targets, loss_fn=self.loss_fn, steps=self.check_steps,
                     optimizer=optimizer)

    def curve(self, candidate: nn.Module, stage: str) -> Evidence:
        """``verify_steps`` training steps of a copy of ``candidate`` with the treatment's recipe."""
        treatment = self.treatment
        assert treatment is not None
        return loss_curve(candidate, stage, self.inputs, self.targets, self.loss_fn, self.data, self.verify_steps,
                          self.seed, lambda m: treatment.optimizer(m.parameters()), treatment.clip,
                          treatment.schedule)


def _weights_trained(model: nn.Module, trained: bool | None) -> tuple[bool, str]:
    """Whether to treat the weights as trained, and why: the caller's word, else inferred (trained when unsure)."""
    if trained is not None:
        return trained, "declared by the caller"
    fresh, reason = freshness(model)
    return fresh is not True, f"inferred: {reason}" + ("" if fresh is not None else "; taking the safe side")


def _take_optimizer(treatment: Treatment, optimizer: torch.optim.Optimizer | None) -> None:
    """The caller's optimizer class and hyperparameters become the recipe's (proven with them, handed back)."""
    if optimizer is None:
        return
    defaults = optimizer_defaults(optimizer)
    treatment.optimizer_class, treatment.optimizer_defaults = type(optimizer), defaults
    lr = defaults.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        treatment.lr = float(defaults.pop("lr"))  # the recipe's learning rate from now on
    # else: no learning rate among its arguments, or a tensor one, kept as the caller's (not the recipe's)


def _treat(model: nn.Module, report: Report, course: _Course, trained: bool | None, max_remedies: int) -> Treatment:
    is_trained, reason = _weights_trained(model, trained)
    work = copy.deepcopy(model)  # every trial is a further copy: the caller's model is never touched
    treatment = course.treatment = Treatment(model=work, trained=is_trained, trained_reason=reason)
    _take_optimizer(treatment, course.optimizer)
    if course.verify_steps and course.inputs is not None and \
            not loss_comparable(model, course.inputs, course.targets, course.loss_fn, course.data):
        treatment.skipped.append(("verify", "no loss to compare (no targets, loss_fn or .loss): each remedy was kept "
                                            "on the re-checked gradient profile alone"))
        course.verify_steps = 0
    if course.verify_steps:
        treatment.evidence.append(course.curve(work, "untreated"))
        treatment.evidence[0].kept = True
    current, given_up, done = report, set(), 0
    unjudged = course.unjudged
    if unjudged:
        treatment.skipped.append(("re-run", unjudged))
    if course.replay is not None:
        evidence, current = course.rerun(work, "untreated")
        evidence.kept = True
        treatment.evidence.append(evidence)
        treatment.skipped += [("re-run", note) for note in course.replay.notes]
        kinds = {f.kind for f in report.findings if f.severity != "info"}
        # the failure again, or past it: a loss gone non-finite where the watched run diverged (float16 rounding moves
        # with the thread count) is the same failure further on, and a remedy is judged against it as well
        failed = not math.isfinite(evidence.score)
        if not failed and not any(f.kind in kinds and f.severity != "info" for f in current.findings):
            unjudged = (f"the untreated re-run ({course.replay.steps} steps) did not show {', '.join(sorted(kinds))} "
                        "again: nothing to judge a remedy by (pass the model as it was at step 0 and the run's "
                        "batches)")
            treatment.skipped.append(("re-run", unjudged))
        treatment.report = current
    if unjudged:  # a run's findings no re-run judges: a prescription, nothing changed on the model
        prescribe_unjudged(treatment, report, "no re-run judged it")
        max_remedies = 0
    while done < max_remedies:
        pending = [f for f in current.findings if f.severity != "info" and f.kind not in given_up]
        if not pending:
            break
        finding = pending[0]
        best = _best_trial(finding, work, current, treatment, course, done)
        if best is None:
            given_up.add(finding.kind)
        else:
            work = best.model
            if best.recipe is not None:  # a recipe change, proven by the re-run: it stays in the treatment
                set_recipe_state(treatment, best.recipe)
                treatment.recipe.append(best.rid)
            else:
                treatment.applied.append((best.rid, best.what, why(finding)))
                treatment.redrawn[best.rid] = best.changed
            if best.evidence is not None:
                best.evidence.kept = True
            if best.report is not None:
                current = treatment.report = best.report
            done += 1
        if course.inputs is None and course.replay is None:
            if best is not None:
                treatment.skipped.append(("check", "not re-checked: pass inputs= to check each remedy and go on"))
            break
    treatment.model = work
    if course.replay is None and not unjudged:  # a run's recipe remedies were each judged by a re-run
        recipe(treatment, current, report)
    elif course.replay is not None and not unjudged and treatment.trained and not current.healthy:
        # from trained weights the re-run goes on from where the run is: it cannot replay the run's start, where a
        # warmup acts; what remains is prescribed for the next run from step 0, unproven
        prescribe_unjudged(treatment, current, "the weights are trained: a re-run goes on from them and cannot "
                                               "replay the run's start")
    return treatment


def _best_trial(finding: Finding, work: nn.Module, current: Report, treatment: Treatment, course: _Course,
                done: int) -> _Trial | None:
    """The first trial that clears the finding, else the one that helps most; the others are recorded as tried.

    A run's finding (a re-run judges each trial) goes on past the first that clears: of those that clear, the one whose
    re-run ends at the lowest loss is kept. Its trials are each a re-run of the same recipe, so none is more invasive
    than another by its tier alone, and the first to clear may be the weaker rescue (an explosive RNN: a tenth of the
    lr cleared it at loss 0.99, clipping at 0.52). At init the ranked order decides: the least invasive that clears."""
    best: _Trial | None = None
    passed: list[_Trial] = []
    every = course.replay is not None
    for rid in _candidates(finding, current, work, course, treatment):
        trial = _try(rid, finding, work, current, treatment, course, done)
        if trial is None:
            continue
        if best is None or _better(trial, best):
            if best is not None:
                passed.append(best)
            best = trial
        else:
            passed.append(trial)
        if trial.clears and not every:
            break
    for other in passed:
        if course.replay is not None:
            treatment.skipped.append((other.rid, f"helped less than {best.rid}: re-run, {finding.kind} still "
                                                 f"there or loss {other.evidence.score:.4g}"))
        else:
            treatment.skipped.append((other.rid, f"helped less than {best.rid}: re-checked, "
                                                 f"{_burden(other.report)[0]} error(s), {_burden(other.report)[1]} "
                                                 f"warning(s) remained"))
    return best


def _better(trial: _Trial, best: _Trial) -> bool:
    """Clearing beats not clearing; between two that clear, the lower loss of their re-runs; else the lower key."""
    if trial.clears != best.clears:
        return trial.clears
    if trial.clears and trial.evidence is not None and best.evidence is not None:
        return trial.evidence.score < best.evidence.score
    return trial.key < best.key


@dataclass
class _Trial:
    rid: str
    model: nn.Module
    what: str
    changed: int
    report: Report | None  # the re-check (None without inputs)
    evidence: Evidence | None  # the verification run (None without verify_steps)
    clears: bool  # the finding treated is gone (or down to info)
    key: tuple = ()  # lower is better: (errors, warnings) re-checked; (severity of the kind, loss) re-run
    recipe: dict[str, Any] | None = None  # a recipe change: the treatment's recipe with it


def _try(rid: str, finding: Finding, work: nn.Module, current: Report, treatment: Treatment, course: _Course,
         done: int) -> _Trial | None:
    """Apply one remedy to a copy; None (with the reason recorded) when it cannot apply or does not help."""
    act, inputs, verify_steps = ACTIONS[rid], course.inputs, course.verify_steps
    if any(rid == a for a, _ in treatment.advice):
        return None
    if treatment.trained and not act.keeps_function:
        treatment.advice.append((rid, f"for {why(finding)}: not done on trained weights, it re-draws them or "
                                      "changes what the model computes (pass trained=False if they are fresh)"))
        return None
    if course.replay is not None and inputs is None:
        inputs = course.replay.batches[0][0]  # the run's first batch, for actions that read one
    if act.needs_inputs and inputs is None:
        treatment.skipped.append((rid, "needs a batch: pass inputs="))
        return None
    model = copy.deepcopy(work)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    patient = Patient(model, inputs, current.context, treatment.trained, treatment)
    torch.manual_seed(course.seed + done)
    saved = recipe_state(treatment)
    try:
        what = act.apply(patient)
    except GradmedicError as refused:
        set_recipe_state(treatment, saved)
        treatment.skipped.append((rid, str(refused)))
        return None
    model = patient.model
    changed = _changed(before, model)
    if changed:
        what += f"; {'changed' if treatment.trained else 're-drew or rescaled'} {changed} existing parameter tensor(s)"
    if course.replay is not None:
        try:
            return _rerun_trial(rid, finding, model, what, changed, current, treatment, course, act.on == "recipe")
        finally:
            set_recipe_state(treatment, saved)  # the trial's recipe is kept in its _Trial, set again if it is chosen
    after, clears = None, True
    if inputs is not None:
        after = course.recheck(model)
        if _burden(after) >= _burden(current):
            treatment.skipped.append((rid, f"re-checked: {_burden(after)[0]} error(s), {_burden(after)[1]} warning(s), "
                                           "no better than before"))
            return None
        clears = not any(f.kind == finding.kind and f.severity != "info" for f in after.findings)
    evidence = None
    if verify_steps:
        evidence = course.curve(model, rid)
        treatment.evidence.append(evidence)
        reference = next(e for e in reversed(treatment.evidence[:-1]) if e.kept)
        if not better(evidence, reference):
            treatment.skipped.append((rid, f"{verify_steps} training steps: loss {evidence.score:.4g}, not below "
                                           f"{reference.score:.4g} by the margin"))
            return None
    return _Trial(rid, model, what, changed, after, evidence, clears, _burden(after) if after is not None else ())


def _rerun_trial(rid: str, finding: Finding, model: nn.Module, what: str, changed: int, current: Report,
                 treatment: Treatment, course: _Course, on_recipe: bool) -> _Trial | None:
    """A run's finding: the trial re-runs the run and is kept by ``rerun.judge``."""
    evidence, after = course.rerun(model, rid)
    treatment.evidence.append(evidence)
    reference = next(e for e in reversed(treatment.evidence[:-1]) if e.kept)
    kept, clears, key, verdict = judge(finding.kind, current, after, evidence, reference)
    if not kept:
        treatment.skipped.append((rid, f"re-run {course.replay.steps} steps: {verdict}: not kept"))
        return None
    return _Trial(rid, model, what, changed, after, evidence, clears, key,
                  recipe_state(treatment) if on_recipe else None)
