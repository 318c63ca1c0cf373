"""stalled_updates judges a layer whose weight entries are larger than the model's typical entry (a norm's gain at
1, an embedding drawn from N(0, 1)) by its step per entry against that typical entry, not against its own size: Adam
moves every entry by about lr whatever its scale, so a gain's update/weight is rms(matrix)/rms(gain) below the
matrices' at the same learning rate. Synthetic traces against the hand-derived restatement, a real Adam run whose
gains' ratio is derived by hand, a tiny learning rate that still stalls them all, and the corpus's QK-norm GPT (the
false alarm of issue 26)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.diagnosis.rules.updates import STALLED_WARNING
from gradmedic.probes.base import Chunk

STEPS = np.arange(0, 200, 20)
# a 32x32 projection (1056 parameters, entries ~0.18) and a LayerNorm(16)'s gain and bias (32, entries ~1.04): the
# corpus GPT's attention projection and QK-norm
SIZES = {"q": 1056, "q_norm": 32, "head": 528}
RMS = {"q": 0.18, "q_norm": 1.04, "head": 0.05}


def _trace(ratios: dict[str, float]) -> gm.Trace:
    layers = list(SIZES)
    metrics = ["update_to_weight", "weight_norm", "grad_norm"]
    values = np.full((len(STEPS), len(layers), len(metrics)), np.nan)
    for j, layer in enumerate(layers):
        values[:, j, 0] = ratios[layer]
        values[:, j, 1] = RMS[layer] * math.sqrt(SIZES[layer])
        values[:, j, 2] = 1e-2
    meta = {"modules": ["", *layers], "types": {"": "GPT", "q": "Linear", "q_norm": "LayerNorm", "head": "Linear"},
            "roles": {"q": "attn_q", "q_norm": "norm", "head": "linear"}, "params": dict(SIZES)}
    trace = gm.Trace(meta)
    trace.extend(Chunk(steps=STEPS, layers=layers, metrics=metrics, values=values))
    return trace


def _stalled(trace):
    return [f for f in gm.diagnose(trace).findings if f.kind == "stalled_updates"]


def test_a_gain_moving_as_far_per_entry_as_the_matrices_is_not_stalled():
    # typical entry: the median of the non-norm layers' RMS entries, (0.18 + 0.05) / 2 = 0.115; the gain's step per
    # entry against it: 8e-6 x 1.04 / 0.115 = 7.2e-5, above 1e-5 (its own ratio, 8e-6, is below)
    assert _stalled(_trace({"q": 7e-5, "q_norm": 8e-6, "head": 2e-4})) == []


def test_a_gain_that_barely_moves_per_entry_is_still_stalled_with_the_hand_restatement():
    (f,) = _stalled(_trace({"q": 7e-5, "q_norm": 1e-6, "head": 2e-4}))
    assert f.layers == ["q_norm"] and f.severity == "warning"
    typical = np.median([RMS["q"], RMS["head"]])
    assert f.evidence["per_typical_entry[q_norm]"] == pytest.approx(1e-6 * RMS["q_norm"] / typical, rel=1e-6)
    assert f.evidence["update_to_weight[q_norm]"] == pytest.approx(1e-6)
    assert "of the model's typical weight entry" in f.message


def test_a_layer_with_small_entries_is_judged_on_its_own_ratio_as_before():
    # head's entries (0.05) are below the typical 0.115: never judged more strictly, nor more leniently
    (f,) = _stalled(_trace({"q": 7e-5, "q_norm": 1e-4, "head": 9e-6}))
    assert f.layers == ["head"] and "per_typical_entry[head]" not in f.evidence


def _adam_run(lr: float, steps: int = 41) -> gm.Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64),
                          nn.GELU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 16, generator=gen), torch.randint(0, 4, (512,), generator=gen)
    with gm.Monitor(model, optimizer) as monitor:
        for _ in range(steps):
            idx = torch.randint(0, 512, (32,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
        return monitor.diagnose()


def test_adam_at_a_modest_lr_moves_gains_lr_per_entry_and_does_not_stall_them():
    # by hand: Adam moves each entry by at most lr (|m_hat / sqrt(v_hat)| <= 1), so a LayerNorm's gain at 1 and bias
    # at 0 has update/weight <= lr * sqrt(128) / sqrt(64) = 1.4 lr: at lr 3e-6 at most 4.2e-6, below STALLED_WARNING,
    # while the matrices (entries ~1/sqrt(3 x 64) = 0.07) move ~14x more relative to their size
    report = _adam_run(3e-6)
    gains = [k for f in report.findings if f.kind == "stalled_updates" for k in f.layers]
    assert "1" not in gains and "4" not in gains
    assert 3e-6 * math.sqrt(2) < STALLED_WARNING


def test_a_tiny_learning_rate_still_stalls_gains_and_matrices():
    stalled = [f for f in _adam_run(1e-9, steps=21).findings if f.kind == "stalled_updates"]
    assert stalled and {"0", "1", "3", "4"} <= set(stalled[0].layers)


def test_corpus_qk_norm_gpt_at_a_hot_lr_is_not_stalled():
    corpus = pytest.importorskip("tests.training_runs")
    _, trace = corpus.watched("healthy_gpt_qk_norm_hot")
    assert not [f for f in gm.diagnose(trace).findings if f.kind == "stalled_updates"]
