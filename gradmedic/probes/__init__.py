"""Probes: what is measured. One probe per file; PRESETS say which run how often."""

from __future__ import annotations

from typing import Any

from gradmedic.probes.activations import ActivationProbe
from gradmedic.probes.adam import AdamStateProbe
from gradmedic.probes.attention import AttentionProbe
from gradmedic.probes.backward import BackwardSignalProbe
from gradmedic.probes.base import Chunk, LayerIndex, Probe
from gradmedic.probes.gradients import GradientProbe
from gradmedic.probes.nonfinite import NonFiniteProbe
from gradmedic.probes.output_logits import OutputLogitProbe
from gradmedic.probes.signal import SignalProbe
from gradmedic.probes.timesteps import TimeStepProbe

__all__ = ["METRICS", "PRESETS", "PROBES", "SERIES", "ActivationProbe", "AdamStateProbe", "AttentionProbe",
           "BackwardSignalProbe", "Chunk", "GradientProbe", "LayerIndex", "NonFiniteProbe", "OutputLogitProbe", "Probe",
           "SignalProbe", "TimeStepProbe", "build_probes"]

PROBES: dict[str, type[Probe]] = {
    p.name: p for p in (GradientProbe, BackwardSignalProbe, ActivationProbe, TimeStepProbe, NonFiniteProbe,
                       SignalProbe, OutputLogitProbe, AdamStateProbe, AttentionProbe)
}

# every metric and series name a probe writes, declared once by the probe that writes it (``Probe.metrics``,
# ``Probe.series``): what the rules, the reports and the sinks may read
METRICS: frozenset[str] = frozenset(m for p in PROBES.values() for m in p.metrics)
SERIES: frozenset[str] = frozenset(s for p in PROBES.values() for s in p.series)

# name -> {probe name: constructor arguments}. The periods are chosen so that the default costs at
# most ~3% of a training step (see BENCHMARKS.md); "full" measures everything at every step.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cheap": {
        "gradients": {"every": 50, "update_ratio": False},
    },
    "standard": {
        "gradients": {"every": 20},
        "backward": {"every": 20},
        "activations": {"every": 100},
        "timesteps": {"every": 100},
        "nonfinite": {"every": 100},
        "output_logits": {"every": 20},  # one logsumexp over the output at a measured step
        "adam": {"every": 20},  # a few reductions of 4096 entries of Adam's v per tensor
        "attention": {"every": 20},  # hooks on attention modules only; a model without attention pays nothing
    },
    "full": {
        "gradients": {"every": 1},  # zero fraction "auto": 16-bit weights or autocast
        "backward": {"every": 1},
        "activations": {"every": 1},
        "timesteps": {"every": 1, "horizon": True, "horizon_every": 10},  # the horizon: an extra backward
        "nonfinite": {"every": 1},
        "output_logits": {"every": 1},
        "adam": {"every": 1},
        "attention": {"every": 1},
    },
}


def build_probes(preset: str, every: int | None = None) -> list[Probe]:
    """Instantiate a preset's probes; ``every`` overrides every probe's period."""
    probes = []
    for name, kwargs in PRESETS[preset].items():
        kwargs = dict(kwargs)
        if every is not None:
            kwargs["every"] = every
        probes.append(PROBES[name](**kwargs))
    return probes
