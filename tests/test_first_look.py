"""The Monitor's first looks (gradmedic/_first_look.py): the update ratio measured at steps 1, 3, 7 and 15 with a
flush after each, and update_too_large judging plain SGD's early updates by the median layer; a hot-lr run told before
it diverges, a healthy one (a small head moving by a tenth) left alone, Adam's early transient not judged."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic._first_look import FIRST_LOOKS
from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.rules import optimizer as rules
from gradmedic.probes.base import Chunk


def _ratios(step: int, ratios: dict[str, float], optimizer: str | None) -> gm.Trace:
    layers = list(ratios)
    meta = {"modules": ["", *layers], "types": {"": "Sequential", **{k: "Linear" for k in layers}},
            "params": {k: 10 for k in layers}}
    if optimizer is not None:
        meta["optimizer"] = optimizer
    trace = gm.Trace(meta)
    values = np.array([[[v] for v in ratios.values()]])
    trace.extend(Chunk(np.array([step]), layers, ["update_to_weight"], values))
    return trace


@pytest.mark.parametrize("step, ratios, optimizer, said", [
    (1, {"a": 0.15, "b": 0.2, "c": 0.05}, "SGD", True),  # the median layer moved by 0.15: a hot lr
    (1, {"a": 0.006, "b": 0.11}, "SGD", False),  # one small head at 0.11, the net at 0.06: healthy (measured)
    (7, {"a": 0.006, "b": 0.006, "c": 0.5}, "SGD", False),  # still the median before WHOLE_NET_UNTIL
    (20, {"a": 0.006, "b": 0.006, "c": 0.5}, "SGD", True),  # later, any layer
    (1, {"a": 0.15, "b": 0.2, "c": 0.05}, "Adam", False),  # Adam's first steps: a transient (UPDATE_SETTLE)
    (1, {"a": 0.15, "b": 0.2, "c": 0.05}, None, False),  # no optimizer named: as Adam
    (12, {"a": 0.15, "b": 0.2, "c": 0.05}, "AdamW", True),  # settled
])
def test_update_too_large_judges_plain_sgd_from_its_first_step_by_the_median_layer(step, ratios, optimizer, said):
    assert rules.WHOLE_NET_UNTIL > max(FIRST_LOOKS)  # every first look is judged by the median layer
    found = rules.update_too_large(_ratios(step, ratios, optimizer), Context())
    assert bool(found) == said
    if said:
        assert found[0].kind == "update_too_large" and f"at step {step}" in found[0].message


def _hot_mlp(lr: float, steps: int = 20, preset: str = "standard"):
    """A tanh MLP on a fixed regression batch, plain SGD with momentum; what the Monitor said (by step), its trace
    and the closed Monitor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    said: list[tuple[int, str]] = []
    holder: dict = {}
    mon = gm.Monitor(model, opt, preset=preset, on_finding=lambda f: said.append((holder["step"], f.kind)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            holder["step"] = step
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()
    mon.close()
    return said, mon.trace, mon


def test_a_hot_sgd_run_is_told_at_a_first_look_and_a_healthy_one_is_not():
    said, trace, _ = _hot_mlp(lr=3.0)
    assert trace.meta["optimizer"] == "SGD"
    first = [s for s, kind in said if kind == "update_too_large"]
    assert first and first[0] in FIRST_LOOKS  # said at a first look, not at the first scheduled flush (99)
    assert set(FIRST_LOOKS) <= set(trace.steps.tolist())
    said, _, _ = _hot_mlp(lr=0.01)
    assert said == []


def test_the_cheap_preset_measures_no_update_and_takes_no_first_look():
    said, trace, _ = _hot_mlp(lr=3.0, preset="cheap")
    assert trace.steps.tolist() == [0]  # every 50: step 0 only; no update ratio, no first looks
    assert not [s for s, kind in said if kind == "update_too_large"]


@pytest.mark.parametrize("name", ["high_lr_no_warmup_mlp", "high_lr_no_warmup_cnn", "healthy_mlp_sgd_cosine"])
def test_corpus_hot_lr_runs_are_told_before_they_fail_and_the_healthy_sgd_run_is_not(name):
    corpus = pytest.importorskip("tests.training_runs")
    said: list[tuple[int, str]] = []  # (the step the finding read, its kind): a first look flushes at its own step
    result, _ = corpus.watched(name, None, on_finding=lambda f: said.append((f.evidence.get("step", -1), f.kind)))
    told = [s for s, kind in said if kind == "update_too_large"]
    if result.failure_step is None:
        assert said == []
    else:
        assert told and told[0] <= result.failure_step


def test_what_was_said_while_it_trained_is_kept_and_what_the_end_no_longer_holds_is_listed():
    from gradmedic.integrations._common import said_and_gone

    _, _, mon = _hot_mlp(lr=3.0, steps=5)
    said = mon.said
    assert said and said[0][0] in FIRST_LOOKS and said[0][1].kind == "update_too_large"
    gone = said_and_gone(said, [])  # nothing at the end: every finding said is listed, with its step
    assert len(gone) == len(said) and gone[0].startswith(f"gradmedic: said at step {said[0][0]}, not so at the end")
    assert said_and_gone(said, [f for _, f in said]) == []  # still there at the end: nothing to add
    with gm.Monitor(nn.Linear(2, 2), live=False) as quiet:
        assert quiet.said == []


def _stalled_trace(ratios: dict[int, float], scalars: dict[str, dict[int, float]]) -> gm.Trace:
    trace = gm.Trace({"modules": ["", "fc"], "types": {"": "Sequential", "fc": "Linear"}, "params": {"fc": 10},
                      "optimizer": "Adam"})
    steps = np.array(sorted(ratios))
    values = np.array([[[ratios[s]]] for s in steps])
    extra = {name: (np.array(sorted(v)), np.array([v[k] for k in sorted(v)])) for name, v in scalars.items()}
    trace.extend(Chunk(steps, ["fc"], ["update_to_weight"], values, scalars=extra))
    return trace


def test_updates_that_are_small_by_schedule_are_not_a_stall():
    from gradmedic.diagnosis.rules.updates import stalled_updates

    lr = {s: 1e-3 * min(1.0, s / 30) for s in range(17)}  # a linear warmup from lr 0 (the Trainer's)
    # the first looks' updates: step 1's was made at lr 0, the others at a rising lr (all fine per entry)
    assert stalled_updates(_stalled_trace({1: 0.0, 3: 2e-4, 7: 5e-4}, {"lr": lr}), Context()) == []
    assert stalled_updates(_stalled_trace({1: 0.0}, {}), Context()) == []  # one measurement is not "each step"
    scale = {0: 65536.0, 1: 32768.0, 2: 16384.0, 3: 16384.0, 4: 16384.0}  # GradScaler skipped steps 0 and 1
    assert stalled_updates(_stalled_trace({1: 0.0, 2: 0.0, 4: 1e-3}, {"loss_scale": scale}), Context()) == []
    (f,) = stalled_updates(_stalled_trace({1: 1e-9, 3: 1e-9, 7: 1e-9}, {"lr": {s: 1e-12 for s in range(8)}}),
                           Context())  # a tiny lr from the start: stalled, and said
    assert f.severity == "error" and f.layers == ["fc"]
