"""attention_logit_growth on synthetic traces (table-driven: drifts it must warn on before they pass 1e4, healthy
shapes it must leave alone), its forecast against the hand-derived one, a mid-run diagnosis against the end's trace
cut at that step, and the corpus's GPT runs (tests/training_runs.py, where present)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.diagnosis import prescribe
from gradmedic.diagnosis.rules.attention import DIVERGED_LOGIT, WATCH_BOUND, WATCH_LOGIT
from gradmedic.probes import AttentionProbe
from gradmedic.probes.base import Chunk

LAYERS = ["h.0.attn", "h.1.attn"]
METRICS = list(AttentionProbe.metrics)


def _trace(steps, logits: dict[str, list[float]], bound: float = 0.0, entropy: float = 1.0) -> gm.Trace:
    steps = np.asarray(steps)
    values = np.full((len(steps), len(LAYERS), len(METRICS)), np.nan)
    for j, layer in enumerate(LAYERS):
        if layer in logits:
            values[:, j, 0] = logits[layer]
            values[:, j, 1] = entropy
            values[:, j, 2] = bound
    meta = {"model": "GPT", "modules": ["", *LAYERS], "types": {"": "GPT", **{k: "Attention" for k in LAYERS}},
            "roles": {k: "attention" for k in LAYERS}, "params": {}}
    trace = gm.Trace(meta)
    trace.extend(Chunk(steps=steps, layers=list(LAYERS), metrics=METRICS, values=values))
    return trace


def _found(trace):
    return [f for f in gm.diagnose(trace).findings if f.kind == "attention_logit_growth"]


STEPS = np.arange(0, 400, 20)


def _settles(s):  # grows x80 over the first 100 steps, then stays
    return 80.0 * np.minimum(s, 100) / 100 + 1


CASES = {
    # name: (logits of h.0.attn at STEPS, severity expected at the end, or None)
    "geometric drift from 60, x3 per 100 steps": (60 * 3.0 ** (STEPS / 100), "warning"),
    "passed 1e4": (np.r_[60 * 3.0 ** (STEPS[:-1] / 100), 1.2e4], "error"),
    "an infinite logit": (np.r_[np.full(len(STEPS) - 1, 9.0), np.inf], "error"),
    "healthy, flat at 8": (8 + 0.2 * np.sin(STEPS), None),
    "qk-norm at a hot lr: grows to 8.4 and stays": (3.3 + 5.1 * (1 - np.exp(-STEPS / 40)), None),
    "grows early, settles at 80 (above the watch level)": (_settles(STEPS), None),
    "fast growth, still small (1 to 30)": (30.0 ** (STEPS / STEPS[-1]), None),
    "slow growth from 60, x1.3 per 100 steps": (60 * 1.3 ** (STEPS / 100), None),
    "large but shrinking": (5e3 * 0.5 ** (STEPS / 100), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_synthetic_traces(name):
    logits, expected = CASES[name]
    found = _found(_trace(STEPS, {"h.0.attn": logits, "h.1.attn": np.full(len(STEPS), 3.0)}))
    assert [f.severity for f in found] == ([expected] if expected else [])
    if expected:
        assert found[0].layers == ["h.0.attn"]
        assert found[0].remedies[:4] == ["qk_norm", "lr_warmup", "lower_learning_rate", "clip_grad_norm"]


def test_the_forecast_is_the_hand_derived_one_and_said_in_the_message():
    logits = 60 * 3.0 ** (STEPS / 100)
    (f,) = _found(_trace(STEPS, {"h.0.attn": logits}))
    # 60 * 3^(s/100) = 1e4  <=>  s = 100 log(1e4/60) / log 3; from the last step
    to_go = 100 * math.log(DIVERGED_LOGIT / 60) / math.log(3) - STEPS[-1]
    assert f.evidence["factor_per_100"] == pytest.approx(3.0, rel=1e-9)
    assert f.evidence["steps_to_threshold"] == pytest.approx(to_go, rel=1e-9)
    assert "The max attention logit at 'h.0.attn' grows x3 per 100 steps" in f.message
    assert f"passes 1e+04 in about {int(round(to_go))} steps" in f.message
    assert f.evidence["bound"] == 0 and f.evidence["attn_entropy_last"] == 1.0


def test_a_bound_says_so():
    (f,) = _found(_trace(STEPS, {"h.0.attn": 60 * 3.0 ** (STEPS / 100)}, bound=1.0, entropy=np.nan))
    assert "a bound from the queries' and keys' norms" in f.message
    assert f.evidence["bound"] == 1 and "attn_entropy_last" not in f.evidence


def test_a_bound_under_its_watch_level_is_no_drift_where_the_exact_logit_would_be():
    # x3 per 100 steps, ending at 90: past the exact watch level (50), under the bound's (100, Wortsman et al.'s
    # stable range). A healthy GPT-NeoX under SDPA read such a bound while its exact logits were half of it.
    rising = 0.9 * WATCH_BOUND * 3.0 ** ((STEPS - STEPS[-1]) / 100)
    assert rising[-1] >= WATCH_LOGIT
    (exact,) = _found(_trace(STEPS, {"h.0.attn": rising}))
    assert exact.severity == "warning"
    assert _found(_trace(STEPS, {"h.0.attn": rising}, bound=1.0, entropy=np.nan)) == []
    (past,) = _found(_trace(STEPS, {"h.0.attn": rising * 1.5}, bound=1.0, entropy=np.nan))  # 135: past it, growing
    assert past.severity == "warning" and past.evidence["bound"] == 1


def test_a_bound_past_the_threshold_is_a_warning_that_it_may_be_and_an_exact_one_an_error():
    passed = np.r_[60 * 3.0 ** (STEPS[:-1] / 100), 1.2e4]
    (exact,) = _found(_trace(STEPS, {"h.0.attn": passed}))
    (bounded,) = _found(_trace(STEPS, {"h.0.attn": passed}, bound=1.0, entropy=np.nan))
    assert exact.severity == "error" and bounded.severity == "warning"
    assert "may be past" in bounded.message and bounded.evidence["bound"] == 1


def test_it_warns_before_the_drift_passes_the_threshold():
    logits = 5 * 2.0 ** (STEPS / 40)  # x5.7 per 100 steps; passes 1e4 at step ~439, after the trace ends
    trace = _trace(STEPS, {"h.0.attn": logits})
    first = next(s for s in STEPS if _found(trace.until(int(s))))
    assert logits[list(STEPS).index(first)] >= WATCH_LOGIT  # not before the watch level
    assert first <= 300  # and well ahead of the crossing: 139+ steps
    assert all(f.severity == "warning" for f in _found(trace))


def test_remedies_are_ranked_qk_norm_first_on_any_model():
    for context in ({"model_kind": "transformer", "norm_placement": "pre"}, {"model_kind": "mlp"}):
        assert prescribe("attention_logit_growth", context) == ["qk_norm", "lr_warmup", "lower_learning_rate",
                                                                "clip_grad_norm"]


class _Growing(nn.Module):
    """A one-block attention model whose query weights the test scales up by 6% a step: a geometric drift."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=True)[0])


def test_a_diagnosis_mid_run_equals_the_end_cut_at_that_step():
    torch.manual_seed(0)
    model, x = _Growing(), torch.randn(4, 6, 8)
    mon = gm.Monitor(model, preset="standard", every=5, flush_every=7)
    mid = {}
    for step in range(160):
        model(x).square().mean().backward()
        mon.step()
        model.zero_grad()
        with torch.no_grad():
            model.attn.in_proj_weight[:16].mul_(1.03)
            model.attn.in_proj_weight[16:32].mul_(1.03)
        if step % 30 == 29:
            mid[step] = gm.diagnose(mon.trace).to_json()
    end = mon.trace
    mon.close()
    kinds = {f.kind for f in gm.diagnose(end).findings}
    assert "attention_logit_growth" in kinds
    for step, seen in mid.items():
        assert gm.diagnose(end.until(step)).to_json() == seen
    assert any("attention_logit_growth" in seen for seen in mid.values())


# --- the corpus: the GPT run that goes bad and its healthy twins (tests/training_runs.py, when it is there) ------
def _watch(name: str) -> tuple[int | None, int | None, bool]:
    """(failure step, first cut with the finding, the finding at the end) for one corpus run under the default
    preset, the trace diagnosed at every 10 steps as a live Monitor flushing there would."""
    corpus = pytest.importorskip("tests.training_runs")
    result, trace = corpus.watched(name)
    first = next((cut for cut in range(9, len(result.losses), 10) if _found(trace.until(cut))), None)
    return result.failure_step, first, bool(_found(trace))


def test_corpus_attention_run_is_warned_of_at_least_100_steps_before_it_fails():
    failure, first, at_end = _watch("attention_logit_growth_gpt")
    assert failure is not None and first is not None and at_end
    assert failure - first >= 100


@pytest.mark.parametrize("name", ["healthy_gpt_qk_norm_hot", "healthy_gpt_warmup_clip"])
def test_corpus_healthy_twins_are_never_warned(name):
    failure, first, at_end = _watch(name)
    assert failure is None and first is None and not at_end
