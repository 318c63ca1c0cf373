"""Diagnosis: a trace in, a Report of findings with causes and ranked remedies out.

``findings.py`` holds what a person gets (Finding, Report, KINDS), ``catalog.py`` the remedies (REMEDIES),
``context.py`` what the rules know of the model (Context), ``rules/`` the rules, one file per family of kinds."""

from __future__ import annotations

from gradmedic._errors import bad_argument
from gradmedic.diagnosis.catalog import REMEDIES, Remedy
from gradmedic.diagnosis.context import Context, context_of
from gradmedic.diagnosis.findings import KINDS, SEVERITIES, Finding, Report, first_remedy, register_first_remedy
from gradmedic.diagnosis.rules import RULES, Rule, prescribe, run_rules
from gradmedic.trace import Trace

__all__ = ["KINDS", "REMEDIES", "RULES", "SEVERITIES", "Context", "Finding", "Remedy", "Report", "Rule", "context_of",
           "diagnose", "first_remedy", "prescribe", "register_first_remedy"]


def diagnose(trace: Trace) -> Report:
    """Findings about a model or a training run, from its trace (a Monitor's, or one loaded from disk)."""
    if not isinstance(trace, Trace):
        raise bad_argument("trace", "a gradmedic.Trace (monitor.trace or Trace.load(path))", trace)
    findings, context = run_rules(trace)
    return Report(findings, trace=trace, context=context)
