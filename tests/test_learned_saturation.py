"""Saturation a net learned versus saturation it started with (the training-watch corpus's false alarm).

``saturated_units``' shares are init-time reasoning: a net saturated before it learns passes nothing back. A tanh net
that learns drives units to +-1 where the loss wants them (healthy_adam_eps_default: 34% of its last tanh layer
saturated at a loss of 0.002, from 2.3). A layer whose share first reached the warning line after the loss had
fallen below half its start is information; one saturated from the first step, or while the loss has not fallen,
is judged as before.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.diagnosis.rules.units import LEARNED_LOSS_FALL, SATURATED_WARNING
from gradmedic.probes.base import Chunk

STEPS = np.arange(0, 401, 100)


def _trace(loss, saturated) -> gm.Trace:
    """A loss at every step 0..400 and the saturated share of layer 'act' at steps 0, 100, ..., 400."""
    trace = gm.Trace({"modules": ["", "fc", "act"], "types": {"": "Sequential", "fc": "Linear", "act": "Tanh"},
                      "params": {"fc": 10}})
    trace.extend(Chunk(np.zeros(0, np.int64), [], [], np.zeros((0, 0, 0)),
                       scalars={"loss": (np.arange(len(loss)), np.asarray(loss, dtype=float))}))
    values = np.asarray(saturated, dtype=float).reshape(len(STEPS), 1, 1)
    trace.extend(Chunk(STEPS.astype(np.int64), ["act"], ["saturated_frac"], values))
    return trace


def _saturated(trace):
    return [(f.severity, f.layers) for f in gm.diagnose(trace).findings if f.kind == "saturated_units"]


FALLING = 2.3 * np.exp(-np.arange(401) / 30)  # 2.3 -> 0.004: a net that fits
FLAT = np.full(401, 2.3)  # a net that does not learn
RISING_SHARE = [0.02, 0.18, 0.28, 0.31, 0.34]  # healthy_adam_eps_default's last tanh layer, with a step-0 read


@pytest.mark.parametrize("loss,share,want", [
    (FALLING, RISING_SHARE, "info"),  # reached 30% at a loss ~1e-4 of its start: learned
    (FLAT, RISING_SHARE, "warning"),  # the same saturation while nothing is learned
    (FALLING, [0.6, 0.6, 0.55, 0.5, 0.5], "warning"),  # saturated from the first step: a bad init, as before
    (FALLING, [0.02, 0.4, 0.7, 0.85, 0.9], "error"),  # a wall is a wall, learned or not
    (-FALLING, RISING_SHARE, "warning"),  # a loss below zero has no "half its start"
])
def test_saturation_is_information_only_when_reached_after_the_loss_fell(loss, share, want):
    assert _saturated(_trace(loss, share))[0] == (want, ["act"])


def test_the_fall_is_read_at_the_first_step_the_layer_crossed_the_warning_line():
    # the loss halves only at step ~250; the layer crossed 30% at step 200, before it: as before
    loss = np.where(np.arange(401) < 250, 2.3, 0.5)
    assert _saturated(_trace(loss, [0.02, 0.2, 0.32, 0.34, 0.35]))[0] == ("warning", ["act"])
    assert _saturated(_trace(loss, [0.02, 0.2, 0.25, 0.34, 0.35]))[0] == ("info", ["act"])  # crossed at 300
    assert 0.5 / 2.3 < LEARNED_LOSS_FALL  # the premise: the fall after step 250 counts


def test_the_training_corpus_tanh_mlp_trained_with_adam_has_no_saturation_warning():
    """tests/training_runs.py's healthy_adam_eps_default under the default Monitor (activations every 100 steps)."""
    from tests import training_runs as corpus

    holder = {}

    def on_step(step, model, optimizer, loss):
        if "monitor" not in holder:
            holder["monitor"] = gm.Monitor(model, optimizer)
        holder["monitor"].step(loss)

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = corpus.run(corpus.by_name("healthy_adam_eps_default"), on_step)
    holder["monitor"].close()
    trace = holder["monitor"].trace
    assert result.final_loss < 0.05  # the premise: it fits
    assert np.nanmax(trace.metric("saturated_frac")) >= SATURATED_WARNING  # and its units saturate as it does
    found = [f for f in gm.diagnose(trace).findings if f.kind == "saturated_units"]
    assert found and all(f.severity == "info" for f in found), found


def test_a_tanh_net_saturated_at_init_still_warns_after_steps():
    """The sick twin: N(0, 1) weights saturate a tanh MLP before it learns (Glorot & Bengio 2010)."""
    torch.manual_seed(0)
    layers = []
    for a, b in [(16, 64), (64, 64), (64, 64)]:
        lin = nn.Linear(a, b)
        nn.init.normal_(lin.weight, 0.0, 1.0)
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(64, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gm.check(model, x, targets=y, steps=20)
    assert [f.severity for f in report.of_kind("saturated_units")][0] in ("warning", "error"), repr(report)
