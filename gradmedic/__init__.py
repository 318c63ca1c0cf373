"""gradmedic: find, explain and fix vanishing and exploding gradients in PyTorch models."""

from gradmedic._startup import interrupt_ends_the_command

try:  # importing torch takes seconds: Ctrl-C then is one line for the gradmedic command (gradmedic._startup)
    with interrupt_ends_the_command():
        from gradmedic._errors import GradmedicError, GradmedicFindingWarning, GradmedicWarning
        from gradmedic.check import check
        from gradmedic.diagnosis import KINDS, REMEDIES, Finding, Report, diagnose
        from gradmedic.monitor import Monitor
        from gradmedic.remedies import Treatment, treat
        from gradmedic.report import notebook as _notebook  # noqa: F401  (how the objects draw in Jupyter)
        from gradmedic.trace import Trace
except KeyboardInterrupt:
    from gradmedic._startup import interrupted_while_importing

    interrupted_while_importing()
    raise

__version__ = "0.1.0"

__all__ = ["KINDS", "REMEDIES", "Finding", "GradmedicError", "GradmedicFindingWarning", "GradmedicWarning", "Monitor",
           "Report", "Trace", "Treatment", "__version__", "check", "diagnose", "treat"]
