"""Diagnosis: a trace in, a Report of findings with causes and ranked remedies out."""

from __future__ import annotations

from gradmedic.diagnosis.findings import KINDS, SEVERITIES, Finding, Report
from gradmedic.diagnosis.prescriptions import REMEDIES, Remedy, prescribe
from gradmedic.diagnosis.rules import RULES, context_of, run_rules
from gradmedic.trace import Trace

__all__ = ["KINDS", "REMEDIES", "RULES", "SEVERITIES", "Finding", "Remedy", "Report", "context_of", "diagnose",
           "prescribe"]


def diagnose(trace: Trace) -> Report:
    """Findings about a model or a training run, from its trace (a Monitor's, or one loaded from disk)."""
    if not isinstance(trace, Trace):
        from gradmedic._errors import bad_argument

        raise bad_argument("trace", "a gradmedic.Trace (monitor.trace or Trace.load(path))", trace)
    findings, context = run_rules(trace)
    return Report(findings, trace=trace, context=context)
