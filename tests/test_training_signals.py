"""The probes of issue 26's training signals against independent computations: log Z against a float64 logsumexp by
hand, Adam's state against v recomputed from its definition out of the gradients of each step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.probes import AdamStateProbe, OutputLogitProbe
from gradmedic.probes.output_logits import output_logits


def _hand_log_z(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


class _LM(nn.Module):
    """A tiny language model head: (B, T) ids -> (B, T, V) logits, scaled so that log Z is far from log V."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.emb, self.head, self.as_dict = nn.Embedding(11, 8), nn.Linear(8, 11), as_dict

    def forward(self, ids):
        logits = 4.0 * self.head(self.emb(ids))
        return {"loss": logits.mean(), "logits": logits} if self.as_dict else logits


@pytest.mark.parametrize("as_dict", [False, True])
def test_log_z_is_the_mean_and_max_of_a_hand_logsumexp(as_dict):
    torch.manual_seed(0)
    model = _LM(as_dict)
    mon = gm.Monitor(model, probes=[OutputLogitProbe()])
    seen = []
    for _ in range(3):
        ids = torch.randint(0, 11, (4, 6))
        out = model(ids)
        logits = out["logits"] if as_dict else out
        seen.append(logits.detach().numpy())
        logits.square().mean().backward()
        mon.step()
    trace = mon.trace
    row = trace.layers.index("")
    for s, logits in enumerate(seen):
        want = _hand_log_z(logits)
        assert trace.metric("log_z")[s, row] == pytest.approx(want.mean(), rel=1e-5)
        assert trace.metric("log_z_max")[s, row] == pytest.approx(np.abs(want).max(), rel=1e-5)
    mon.close()


def test_outputs_that_are_not_logits_are_not_read():
    assert output_logits(torch.randn(5, 1)) is None  # a regression's single output: no softmax
    assert output_logits(torch.tensor(1.0)) is None
    assert output_logits(torch.arange(4)) is None  # not floating point
    logits = torch.randn(2, 3)
    assert output_logits({"loss": torch.tensor(0.5), "logits": logits}) is logits
    model = nn.Linear(3, 1)
    mon = gm.Monitor(model, probes=[OutputLogitProbe()])
    model(torch.randn(4, 3)).sum().backward()
    mon.step()
    assert "log_z" not in mon.trace.metrics or np.isnan(mon.trace.metric("log_z")).all()
    mon.close()


def _train_adam(model, eps, steps, bind, betas=(0.9, 0.999)):
    """Train with Adam; return the trace and, per step, each parameter's gradient in float64 (after backward)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps, betas=betas)
    probe = AdamStateProbe()
    mon = gm.Monitor(model, opt, probes=[probe])
    if bind:
        probe.bind(opt)
    grads = []
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).square().mean() * 1e-3  # small gradients: sqrt(v_hat) around eps for some entries
        loss.backward()
        grads.append({n: p.grad.detach().double().clone() for n, p in model.named_parameters()})
        opt.step()  # the probe reads the state after this step at the next Monitor.step
        mon.step(loss)
        opt.zero_grad()
    trace = mon.trace
    mon.close()
    return trace, grads


@pytest.mark.parametrize("bind", [True, False])  # False: found by the first optimizer.step() (a global step hook)
def test_adam_state_against_v_recomputed_from_its_definition(bind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    eps, beta2, steps = 3e-5, 0.999, 6
    trace, grads = _train_adam(model, eps, steps, bind, betas=(0.9, beta2))
    checked = 0
    for layer in ("0", "2"):
        g = [step[f"{layer}.weight"] for step in grads]  # weight matrices only; biases are not read
        v = torch.zeros_like(g[0])
        for t in range(steps):
            v = beta2 * v + (1 - beta2) * g[t] ** 2  # Kingma & Ba 2015, algorithm 1
            sqrt_v_hat = (v / (1 - beta2 ** (t + 1))).sqrt()
            seen = v > 0
            share = float((sqrt_v_hat[seen] < eps).double().mean())
            margin = math.exp(float((sqrt_v_hat[seen] / eps).log().mean()))
            j, s = trace.layers.index(layer), list(trace.steps).index(t)
            # float32 state against float64: an entry within rounding of eps may fall on either side (one entry)
            assert trace.metric("adam_eps_share")[s, j] == pytest.approx(share, abs=1.5 / g[0].numel())
            assert trace.metric("adam_rms_to_eps")[s, j] == pytest.approx(margin, rel=1e-4)
            checked += 1
    assert checked == 2 * steps
    assert 0 < trace.metric("adam_eps_share")[-1, trace.layers.index("2")] < 1  # a mid-range case, not 0 or 1


def test_adam_probe_reads_nothing_from_sgd_and_writes_no_host_copy_between_flushes():
    from tests.helpers import count_host_syncs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters(), lr=1e-3)):
        mon = gm.Monitor(model, opt, probes=[AdamStateProbe(), OutputLogitProbe()], flush_every=1000)

        def train(n, mon=mon, opt=opt):
            for _ in range(n):
                model(torch.randn(4, 6)).logsumexp(-1).mean().backward()
                mon.step()
                opt.step()
                opt.zero_grad()

        train(2)  # the first measured steps build the probes' index tensors (Probe.host_tensor)
        with count_host_syncs() as syncs:
            train(5)
        assert dict(syncs) == {}, dict(syncs)
        trace = mon.trace
        has = "adam_eps_share" in trace.metrics and not np.isnan(trace.metric("adam_eps_share")).all()
        assert has == isinstance(opt, torch.optim.Adam)
        mon.close()


def test_adam_probes_waiting_for_their_optimizer_never_break_its_step():
    # each unbound probe waits on a global step hook: binding inside torch's loop over those hooks must not change them
    from torch.optim import optimizer as optim_module

    hooks_before = set(optim_module._global_optimizer_post_hooks)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitors = [gm.Monitor(model, probes=[AdamStateProbe()]) for _ in range(3)]
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        for mon in monitors:
            mon.step()
        opt.zero_grad()
    for mon in monitors:
        assert not np.isnan(mon.trace.metric("adam_rms_to_eps")).all()
        mon.close()
    assert set(optim_module._global_optimizer_post_hooks) <= hooks_before  # every waiting hook removed


def test_a_monitor_dropped_unclosed_leaves_no_model_behind():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    mon = gm.Monitor(model, probes=[AdamStateProbe()])  # waits for an optimizer on a global hook
    alive = weakref.ref(mon.probes[0])
    del mon, model
    gc.collect()
    assert alive() is None  # the hook holds the probe weakly
    torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1).step()  # and does nothing afterwards


def test_adam_state_of_a_large_tensor_is_read_on_a_sample_within_its_error():
    # 96 x 80 = 7680 entries > SAMPLE: 4096 of them, in spread blocks, stand for the tensor (binomial error ~1% on a
    # share near one half)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 96), nn.Tanh(), nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 3))
    trace, grads = _train_adam(model, 1e-6, 4, bind=True)
    g = [step["2.weight"] for step in grads]
    v = sum((1 - 0.999) * 0.999 ** (3 - t) * g[t] ** 2 for t in range(4))
    sqrt_v_hat = (v / (1 - 0.999 ** 4)).sqrt()
    seen = v > 0
    j = trace.layers.index("2")
    assert 0.1 < float((sqrt_v_hat[seen] < 1e-6).double().mean()) < 0.9  # a share the sample must estimate
    assert trace.metric("adam_eps_share")[-1, j] == pytest.approx(float((sqrt_v_hat[seen] < 1e-6).double().mean()),
                                                                  abs=0.03)
    assert trace.metric("adam_rms_to_eps")[-1, j] == pytest.approx(
        math.exp(float((sqrt_v_hat[seen] / 1e-6).log().mean())), rel=0.1)
