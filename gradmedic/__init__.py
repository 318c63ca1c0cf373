"""gradmedic: find, explain and fix vanishing and exploding gradients in PyTorch models."""

from gradmedic._errors import GradmedicError, GradmedicWarning
from gradmedic.monitor import Monitor
from gradmedic.trace import Trace

__version__ = "0.1.0"

__all__ = ["GradmedicError", "GradmedicWarning", "Monitor", "Trace", "__version__"]
