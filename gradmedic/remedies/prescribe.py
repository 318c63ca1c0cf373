"""What goes into a ``Treatment`` without a trial: the model changes no action can carry out on this model (advice:
a change to the model's own code) and the training recipe of the findings that remain.

A run's finding that cannot be judged by re-running the run (no data or optimizer was given, or the model given is
a trained one whose re-run does not fail again) gets its prescription this way too: the recipe its rule ranks first
(warmup for a post-LN model that stalls) and the model changes as advice, never a change to the weights. The
Treatment says that these were not proven (``skipped``).
"""

from __future__ import annotations

import torch

from gradmedic._errors import GradmedicError, first_line
from gradmedic.diagnosis import REMEDIES, Finding, Report
from gradmedic.remedies.actions import ACTIONS, Patient
from gradmedic.remedies.order import NEEDS, remedy_order

__all__ = ["advise", "prescribe_unjudged", "recipe", "why"]


def why(finding: Finding) -> str:
    return f"{finding.severity} {finding.kind} at {', '.join(finding.layers[:2]) or 'the model'}"


def advise(treatment, finding: Finding, left_out: dict[str, str] | None = None) -> None:
    """The finding's model-side remedies that no action can carry out: changes to the model's own code (no action at
    all; with ``left_out``, from ``remedy_order``, also one for torch.nn classes the model does not hold: ``pre_ln`` on
    a Hugging Face BERT, prescribed when no trial could be judged)."""
    for rid in finding.remedies:
        if REMEDIES[rid].acts_on != "model" or rid in dict(treatment.advice):
            continue
        if rid not in ACTIONS:
            treatment.advice.append((rid, f"for {why(finding)}: a change to the model's code, "
                                          f"{REMEDIES[rid].description}"))
        elif left_out and rid in left_out and rid in NEEDS:
            treatment.advice.append((rid, f"for {why(finding)}: a change to the model's code ({left_out[rid]}), "
                                          f"{REMEDIES[rid].description}"))


def recipe(treatment, current: Report, original: Report) -> None:
    """The best training-side remedy of each finding that remains (or of the original's, unchecked)."""
    for finding in (f for f in current.findings if f.severity != "info"):
        for rid in finding.remedies:
            act = ACTIONS.get(rid)
            if act is None or act.on != "recipe":
                continue
            if rid not in treatment.recipe:
                try:
                    act.apply(Patient(treatment.model, trained=treatment.trained, treatment=treatment))
                except GradmedicError as refused:  # this recipe has it already (eps at 1e-15), or cannot take it
                    treatment.skipped.append((rid, first_line(refused)))
                    continue  # the finding's next recipe remedy
                treatment.recipe.append(rid)
            break
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in treatment.model.parameters()) and \
            any(f.kind == "gradient_underflow" for f in original.findings):
        treatment.loss_scaling = True


def prescribe_unjudged(treatment, report: Report, reason: str) -> None:
    """A run's findings that no re-run could judge: advice for the model (nothing is changed on it; a remedy that
    would re-draw trained weights is advice too) and the recipe, each said to be unproven."""
    types = {name: type(module).__name__ for name, module in treatment.model.named_modules()}
    for finding in (f for f in report.findings if f.severity != "info"):
        order, left_out = remedy_order(finding, report, run=True, types=types)
        advise(treatment, finding, left_out)
        for rid in order:
            if ACTIONS[rid].on == "model" and rid not in dict(treatment.advice) and rid not in dict(treatment.skipped):
                treatment.advice.append((rid, f"for {why(finding)}: not tried, {reason}"))
    before = list(treatment.recipe)
    recipe(treatment, report, report)
    added = [rid for rid in treatment.recipe if rid not in before]
    if added:
        treatment.skipped.append(("re-run", f"recipe {', '.join(added)}: the findings' prescription, not proven by a "
                                            f"re-run ({reason})"))
