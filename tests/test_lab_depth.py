"""The transformer depth experiment (issue 30) at smoke size: the stream record against an independent autograd
path, LayerScale's and ReZero's near-identity start, and the suite -> store -> claims -> publish path with fewer
seeds at the deeper runs (seconds; the `depth` suite itself runs 6 to 1000 blocks)."""

import math

import pytest
import torch
from torch.nn import functional as F

from gradmedic.lab.claims import group_results, judge
from gradmedic.lab.experiment import run_experiment
from gradmedic.lab.publish import DEPTH_BEGIN, DEPTH_END, DEPTH_FIGURE, publish
from gradmedic.lab.store import Store
from gradmedic.lab.suites import SUITES, Suite, _depth_experiment, _depth_init_experiment
from gradmedic.lab.transformer import TransformerSpec, build_transformer, layerscale_eps, stream_changes
from tests.helpers import lab_first_batch

SMALL = {"task": "recall", "length": 4, "model": "transformer", "lr": 3e-3, "batch": 16, "fused": True}


def test_layerscale_gain_follows_cait_and_starts_near_the_identity():
    assert (layerscale_eps(12), layerscale_eps(24), layerscale_eps(1000)) == (0.1, 1e-5, 1e-6)  # Touvron et al.
    tokens = torch.randint(0, 32, (8, 9))
    rezero = build_transformer(TransformerSpec(depth=4, variant="rezero", vocab=32, max_len=9))
    assert stream_changes(rezero, tokens) == [0.0] * 4  # alpha = 0: every block is the identity
    scaled = build_transformer(TransformerSpec(depth=30, variant="layerscale", vocab=32, max_len=9))
    changes = stream_changes(scaled, tokens)
    pre = stream_changes(build_transformer(TransformerSpec(depth=30, variant="pre", vocab=32, max_len=9)), tokens)
    # |g f(LN x)| / |x| with g = 1e-6 against pre-LN's |f(LN x)| / |x| (measured 0.05-0.6): 1e-6 times as large
    # within the spread of |f| between two draws
    assert len(changes) == 30 and max(changes) < 1e-4 * min(pre)


def test_stream_gradient_matches_autograd_on_the_same_batch():
    config = {**SMALL, "spec": {"depth": 4, "variant": "post", "width": 16, "ff": 32}, "steps": 1, "seed": 2}
    r = run_experiment(config)
    model, task, x, y = lab_first_batch(config)
    states = model.stream(x)
    for s in states[1:]:
        s.retain_grad()
    loss = F.cross_entropy(model.head(model.norm(states[-1])[:, -1]), y)
    loss.backward()
    rms = [float(s.grad.pow(2).mean().sqrt()) for s in states[1:]]
    stream = r["stream"]
    assert stream["steps"][0] == 0 and len(stream["init"]) == 4
    assert stream["init"] == pytest.approx(rms, rel=1e-4)  # float32, same weights and batch
    assert stream["ratio_init"] == pytest.approx(rms[0] / rms[-1], rel=1e-4)
    assert stream["changes_init"] == pytest.approx(stream_changes(model, task.x_train[:256]), rel=1e-5)


def test_depth_suite_runs_fewer_seeds_at_depth_and_publishes(tmp_path):
    assert {c["spec"]["depth"] for c in SUITES["depth"].configs} == {6, 24, 96, 384, 1000}
    layouts = ("post", "post + warmup", "pre", "deepnorm", "rezero", "layerscale")
    tiny = ((2, 6, (0, 1), layouts), (3, 6, (0,), layouts))
    suite = Suite("tiny_depth", "smoke-sized depth", (_depth_experiment(tiny), _depth_init_experiment((2, 3))),
                  seeds=(0, 1))
    assert len(suite.configs) == 6 * 2 + 6 + 5 * 2 * 2  # two seeds at 2 blocks, one at 3; init: 5 layouts x 2 x 2
    store = Store(tmp_path / "lab.db")
    for config in suite.configs:
        run = {k: v for k, v in config.items() if k not in ("experiment", "label")}
        store.put("tiny_depth", config, run_experiment({**run, "batch": 8}), 1.0)
    rows = [(c, r) for _, c, r, _ in store.results("tiny_depth")]
    verdicts = {v.claim: v for v in judge(group_results(rows))}
    scaled = verdicts["DeepNorm, ReZero and LayerScale train transformers at 1000 layers"]
    assert scaled.verdict == "not run"  # no run at 1000 blocks: shallower ones say nothing of the claim
    pre = verdicts["Pre-LN trains deep stacks without warmup"]
    assert pre.verdict == "not run"  # the deep-stack claim starts at 24 blocks
    warmup = verdicts["Post-LN needs a learning-rate warmup, more so with depth"]
    assert warmup.verdict != "not run" and "post-LN d=2 (no warmup): baseline - loss" in warmup.evidence
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{DEPTH_BEGIN}\nSTALE TABLE\n{DEPTH_END}\nrest\n")
    publish(tmp_path / "lab.db", "tiny_depth", [page])
    text = page.read_text()
    assert "STALE TABLE" not in text and text.endswith(f"{DEPTH_END}\nrest\n")
    assert "| layerscale | 3 | 6 x 1 |" in text and "| post + warmup | 2 | 6 x 2 |" in text
    assert "The stream's gradient at init" in text
    init_rows = [line for line in text.splitlines() if line.startswith("| rezero | ")]
    assert init_rows[-1] == "| rezero | 1 | 1 |"  # alpha = 0: every block passes the gradient unchanged
    assert (tmp_path / DEPTH_FIGURE).stat().st_size > 1000 and "](docs/figures/lab-depth.png)" in text
    for _, r in rows:
        assert all(math.isfinite(v) for v in r["stream"]["init"])
