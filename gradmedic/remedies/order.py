"""The one order in which a finding's remedies are tried, and so the first remedy that the terminal, the HTML page,
the JSON and ``treat`` name for it, with why.

- **A finding at init** (``gm.check``): the model changes ``treat`` can carry out, least invasive first
  (``trial_order``: a scale, reviving units, re-drawing, inserting, replacing; the diagnosis's rank within a tier).
  Training-side remedies go to the recipe, unchecked: one look at a model cannot judge a learning rate.
- **A finding from a run** (a Monitor's or a callback's trace; ``from_run``): training-side remedies are tried too,
  at their tier (a recipe change is a scale, the least invasive), since a re-run of the recipe judges them as it
  judges a model change (``remedies/rerun.py``).
- **What cannot apply to this model is not offered first**: an action that works on ``torch.nn`` classes the model
  does not hold (``pre_ln`` on a Hugging Face BERT, whose layers are ``BertLayer``), or that the model has already
  (normalisation in a normalised net), is put behind those that can. It is read from the module classes the trace
  recorded (``trace.meta["types"]``), so a report loaded from a file orders its remedies as the live one did.
- With no action that applies, the top-ranked remedy comes first, as advice (a change to the model's own code).

``choose(finding, report)`` is registered with the diagnosis stage at import (``register_first_remedy``), which is
how ``str(report)`` and ``report.to_dict()`` name the same remedy without the diagnosis importing the remedies.
"""

from __future__ import annotations

from collections.abc import Mapping

from gradmedic.diagnosis import REMEDIES, Finding, Report, register_first_remedy
from gradmedic.remedies.actions import ACTIONS, TIERS
from gradmedic.remedies.treatment import trial_order

__all__ = ["NEEDS", "TRAINING_KINDS", "applies", "choose", "from_run", "remedy_order"]

# The kinds only a run can show (issue 26): a trace with one of them is a run's, whatever its length.
TRAINING_KINDS = frozenset({"loss_spike", "divergence", "output_logit_drift", "adam_epsilon", "update_too_large",
                            "loss_scale_collapse", "attention_logit_growth"})

# Module classes (by name, as the trace records them) of which an action needs one to act at all; the action raises
# "no torch.nn TransformerEncoderLayer..." (and the like) without. tests/test_first_remedy.py checks each entry
# against the action itself: it refuses a model without them and applies to one with them.
NEEDS: dict[str, tuple[str, ...]] = {
    "pre_ln": ("TransformerEncoderLayer", "TransformerDecoderLayer"),
    "layerscale": ("TransformerEncoderLayer", "TransformerDecoderLayer"),
    "deepnorm": ("TransformerEncoderLayer", "TransformerDecoderLayer"),
    "identity_recurrent_init": ("RNN",),
    "gated_recurrence": ("RNN",),
    "forget_gate_bias": ("LSTM", "GRU"),
}
_TIER_NAMES = {v: k for k, v in TIERS.items()}


def from_run(report: Report) -> bool:
    """Is this a finding set from a training run (a Monitor's or a callback's trace), not from ``gm.check``?"""
    if any(f.kind in TRAINING_KINDS for f in report.findings):
        return True
    trace = report.trace
    return trace is not None and "check" not in trace.meta and len(trace.steps) > 0 and int(trace.steps.max()) > 0


def applies(rid: str, types: Mapping[str, str] | None, normalized: bool = False) -> str | None:
    """None when action ``rid`` can act on a model with these module types (layer -> class name, the root under
    ""), else why not; with no types known, everything may apply."""
    if rid == "add_normalization" and normalized:
        return "the model is normalised already"
    if types is None:
        return None
    if rid == "add_residual" and types.get("") not in (None, "Sequential"):
        return "residual blocks are formed from an nn.Sequential's children"
    needs = NEEDS.get(rid)
    if needs and not set(needs) & set(types.values()):
        return f"needs a torch.nn {' or '.join(needs)} (other code: apply the change in its own definition)"
    return None


def remedy_order(finding: Finding, report: Report | None = None, run: bool | None = None,
                 types: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The actions ``treat`` tries for ``finding``, in order, and those left out with why (they cannot apply).
    ``run``: judge as a run's finding (default: ``from_run(report)``); ``types``: the model's module classes
    (default: the report's trace)."""
    if run is None:
        run = report is not None and from_run(report)
    if types is None and report is not None and report.trace is not None:
        types = report.trace.meta.get("types")
    normalized = bool(report is not None and report.context.normalized)
    if run:  # recipe changes too, each at its tier (stable: the diagnosis's rank within one)
        ranked = sorted((rid for rid in finding.remedies if rid in ACTIONS), key=lambda rid: ACTIONS[rid].tier)
    else:
        ranked = trial_order(finding.remedies)
    order, left_out = [], {}
    for rid in ranked:
        why = applies(rid, types, normalized)
        if why is None:
            order.append(rid)
        else:
            left_out[rid] = why
    return order, left_out


def choose(finding: Finding, report: Report | None = None) -> tuple[str | None, str]:
    """The first remedy for ``finding`` and why it is first (None for a finding without remedies)."""
    if not finding.remedies:
        return None, "no remedy applies: the finding says what to look for"
    order, left_out = remedy_order(finding, report)
    first = order[0] if order else None
    rank = finding.remedies.index(first) if first is not None else len(finding.remedies)
    skipped = "; ".join(f"{rid} ranks higher but does not apply here ({why})" for rid, why in left_out.items()
                        if finding.remedies.index(rid) < rank)
    tail = f"; {skipped}" if skipped else ""
    if first is not None:
        where = "the training recipe" if ACTIONS[first].on == "recipe" else "the model"
        judged = "a re-run of the recipe judges it" if report is not None and from_run(report) else \
            "a re-check judges it"
        tier = _TIER_NAMES.get(ACTIONS[first].tier, "")
        return first, (f"the least invasive ranked change to {where} that applies ({tier}); gm.treat tries it first "
                       f"and {judged}{tail}")
    recipe = [rid for rid in finding.remedies if REMEDIES[rid].acts_on == "training"]
    if recipe:
        return recipe[0], f"no model change applies; gm.treat puts it in the training recipe{tail}"
    return finding.remedies[0], f"the diagnosis's top-ranked remedy, a change to the model's own code{tail}"


register_first_remedy(choose)
