"""The attention probe against an independent computation: the logits computed by hand in float64 from the same
weights (exact where the model materialises them), the entropy from those probabilities, and the bound from q and k
(where SDPA hides them) against the hand-made bound and the exact max it must not fall below."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradmedic as gm
from gradmedic.architecture import roles
from gradmedic.probes import PRESETS, AttentionProbe
from tests.helpers import count_host_syncs


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v projections; ``sdpa`` picks F.scaled_dot_product_attention."""

    def __init__(self, d: int = 16, heads: int = 2, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, dh)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            t = x.shape[1]
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
            y = scores.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(x.shape))


class Net(nn.Module):
    def __init__(self, sdpa: bool = False, scale: float = 1.0):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = Attention(sdpa=sdpa)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():  # larger logits than at init, so that the numbers are not all near 0
            self.attn.q.weight.mul_(scale)

    def forward(self, x):
        return self.head(self.attn(self.inp(x)))


def _monitored(model, x, steps=1, **kwargs):
    mon = gm.Monitor(model, probes=[AttentionProbe(**kwargs)])
    for _ in range(steps):
        model(x).square().mean().backward()
        mon.step()
    trace = mon.trace
    mon.close()
    return trace


def _reading(trace, layer):
    j = trace.layers.index(layer)
    return {m: trace.metric(m)[-1, j] for m in AttentionProbe.metrics}


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def _by_hand(q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> tuple[float, float, float]:
    """(max logit, mean row entropy, the q/k bound) in float64 from q and k of shape (B, H, T, dh)."""
    q, k = q.double(), k.double()
    scale = 1 / math.sqrt(q.shape[-1])
    logits = q @ k.transpose(-2, -1) * scale
    t = logits.shape[-1]
    if causal:
        logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    p = logits.softmax(-1)
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean()
    bound = (q.norm(dim=-1).amax(-1) * k.norm(dim=-1).amax(-1)).amax() * scale
    return float(logits.amax()), float(entropy), float(bound)


def _qk(model: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = model.inp(x).double()
        a = model.attn
        q = h @ a.q.weight.double().T + a.q.bias.double()
        k = h @ a.k.weight.double().T + a.k.bias.double()
    return _heads(q, a.heads), _heads(k, a.heads)


def test_the_attention_module_is_the_innermost_attention_class():
    assert roles(Net())["attn"] == "attention"
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False)
    found = roles(enc)
    assert found["layers.0.self_attn"] == "attention" and found["layers.1.self_attn"] == "attention"
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    found = roles(bert)
    # BertAttention holds BertSelfAttention (the logits) and its output projection: only the inner one
    assert found["encoder.layer.0.attention.self"] == "attention"
    assert found.get("encoder.layer.0.attention") != "attention"


def test_materialised_logits_and_entropy_are_exact():
    torch.manual_seed(0)
    model, x = Net(scale=3.0), torch.randn(4, 6, 8)
    got = _reading(_monitored(model, x), "attn")
    top, entropy, _ = _by_hand(*_qk(model, x))
    assert got["attn_logit_max"] == pytest.approx(top, rel=1e-5)
    assert got["attn_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert got["attn_logit_bound"] == 0


def test_sdpa_logits_are_bounded_from_q_and_k_and_marked_as_a_bound():
    torch.manual_seed(0)
    model, x = Net(sdpa=True, scale=3.0), torch.randn(4, 6, 8)
    got = _reading(_monitored(model, x), "attn")
    top, _, bound = _by_hand(*_qk(model, x))
    assert got["attn_logit_max"] == pytest.approx(bound, rel=1e-5)
    assert got["attn_logit_max"] >= top
    assert got["attn_logit_bound"] == 1
    assert math.isnan(got["attn_entropy"])  # the probabilities are never seen


def _mha_qk(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
        d = mha.embed_dim
        q = x.double() @ w[:d].T + b[:d]
        k = x.double() @ w[d:2 * d].T + b[d:2 * d]
    return _heads(q, mha.num_heads), _heads(k, mha.num_heads)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_exact_with_weights_and_bounded_through_sdpa(need_weights):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.mul_(2.0)
    x = torch.randn(3, 7, 16)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True: not allowed
    mon = gm.Monitor(mha, probes=[AttentionProbe()])
    mha(x, x, x, attn_mask=causal, need_weights=need_weights)[0].square().mean().backward()
    mon.step()
    got = _reading(mon.trace, "")
    mon.close()
    top, entropy, bound = _by_hand(*_mha_qk(mha, x))
    if need_weights:  # the math path: softmax of the materialised logits
        assert got["attn_logit_max"] == pytest.approx(top, rel=1e-5)
        assert got["attn_entropy"] == pytest.approx(entropy, rel=1e-5)
        assert got["attn_logit_bound"] == 0
    else:  # inside F.multi_head_attention_forward, SDPA (seen at the ATen level)
        assert got["attn_logit_max"] == pytest.approx(bound, rel=1e-5)
        assert got["attn_logit_max"] >= top
        assert got["attn_logit_bound"] == 1


def test_transformer_encoder_layers_are_read_each_under_its_own_attention():
    torch.manual_seed(2)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 2,
                                enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    inputs = {}
    handles = [enc.layers[i].self_attn.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, args[0].detach())) for i in range(2)]
    trace = _monitored(enc, x)
    for h in handles:
        h.remove()
    for i in range(2):
        got = _reading(trace, f"layers.{i}.self_attn")
        top, _, bound = _by_hand(*_mha_qk(enc.layers[i].self_attn, inputs[i]), causal=False)
        assert got["attn_logit_max"] == pytest.approx(bound, rel=1e-5) and bound >= top
        assert got["attn_logit_bound"] == 1


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hugging_face_gpt2_eager_exact_and_sdpa_bounded(implementation):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    config._attn_implementation = implementation
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (2, 9))
    qkv = {}
    handles = [model.transformer.h[i].attn.c_attn.register_forward_hook(
        lambda m, a, out, i=i: qkv.__setitem__(i, out.detach())) for i in range(2)]
    mon = gm.Monitor(model, probes=[AttentionProbe()])
    model(ids, labels=ids).loss.backward()
    mon.step()
    trace = mon.trace
    mon.close()
    for h in handles:
        h.remove()
    for i in range(2):
        q, k, _ = qkv[i].split(32, dim=-1)
        top, entropy, bound = _by_hand(_heads(q, 4), _heads(k, 4))
        got = _reading(trace, f"transformer.h.{i}.attn")
        if implementation == "eager":
            assert got["attn_logit_max"] == pytest.approx(top, rel=1e-5)
            assert got["attn_entropy"] == pytest.approx(entropy, rel=1e-5)
            assert got["attn_logit_bound"] == 0
        else:
            assert got["attn_logit_max"] == pytest.approx(bound, rel=1e-5) and bound >= top
            assert got["attn_logit_bound"] == 1


def test_no_host_sync_or_copy_between_flushes():
    torch.manual_seed(4)
    model, x = Net(), torch.randn(4, 6, 8)
    sdpa = Net(sdpa=True)
    both = nn.ModuleDict({"a": model, "b": sdpa})
    mon = gm.Monitor(both, probes=[AttentionProbe()], flush_every=1000)

    def train(steps):
        for _ in range(steps):
            (model(x).square().mean() + sdpa(x).square().mean()).backward()
            mon.step()

    train(1)  # the first step builds nothing on the host either, but stays out of the count like the others' tests
    with count_host_syncs() as syncs:
        train(5)
    assert dict(syncs) == {}, f"host syncs or copies between flushes: {dict(syncs)}"
    with count_host_syncs() as at_flush:
        mon.flush()
    assert sum(at_flush.values()) >= 1
    assert np.isfinite(mon.trace.metric("attn_logit_max")).sum() == 2 * 6
    mon.close()


def test_only_training_forwards_and_only_attention_softmaxes_are_read():
    torch.manual_seed(5)
    model, x = Net(scale=2.0), torch.randn(4, 6, 8)
    mon = gm.Monitor(model, probes=[AttentionProbe()])
    with torch.no_grad():  # an evaluation forward: not measured
        model(x * 100)
    logits = model(x)
    F.softmax(logits, -1)  # a classifier's softmax outside any attention module: never looked at
    logits.square().mean().backward()
    mon.step()
    got = _reading(mon.trace, "attn")
    mon.close()
    assert got["attn_logit_max"] == pytest.approx(_by_hand(*_qk(model, x))[0], rel=1e-5)
    assert mon.trace.layers == ["attn"]
    assert torch._C._len_torch_function_stack() == 0  # the mode is off again


def test_a_model_without_attention_pays_nothing_and_records_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    mon = gm.Monitor(model, probes=[AttentionProbe()])
    assert mon.probes[0]._handles == []
    model(torch.randn(2, 4)).sum().backward()
    mon.step()
    assert "attn_logit_max" not in mon.trace.metrics or np.isnan(mon.trace.metric("attn_logit_max")).all()
    mon.close()


def test_a_failure_inside_the_mode_switches_the_probe_off_and_leaves_training_alone(monkeypatch):
    torch.manual_seed(6)
    model, x = Net(), torch.randn(4, 6, 8)
    mon = gm.Monitor(model, probes=[AttentionProbe()])
    probe = mon.probes[0]

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(probe, "on_softmax", broken)
    want = Net()
    want.load_state_dict(model.state_dict())
    with pytest.warns(gm.GradmedicWarning, match="attention"):
        out = model(x)
    assert torch.equal(out, want(x))
    assert torch._C._len_torch_function_stack() == 0
    out.sum().backward()
    mon.step()
    assert probe.failed and probe._handles == []
    mon.close()


def test_checkpointed_attention_is_read_once():
    torch.manual_seed(7)
    model, x = Net(scale=2.0), torch.randn(4, 6, 8)

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            h = self.net.inp(x)
            h = torch.utils.checkpoint.checkpoint(self.net.attn, h, use_reentrant=False)
            return self.net.head(h)

    wrapped = Checkpointed()
    mon = gm.Monitor(wrapped, probes=[AttentionProbe()])
    wrapped(x).square().mean().backward()
    mon.step()
    assert len(mon.probes[0]._pending) == 1
    calls = next(iter(mon.probes[0]._pending))[0]
    assert calls == (wrapped_row := mon.layers.names.index("net.attn"),)
    got = _reading(mon.trace, "net.attn")
    mon.close()
    assert wrapped_row >= 0
    assert got["attn_logit_max"] == pytest.approx(_by_hand(*_qk(model, x))[0], rel=1e-5)


def test_the_standard_preset_reads_attention_at_a_cadence_and_full_at_every_step():
    assert PRESETS["standard"]["attention"]["every"] >= 10
    assert PRESETS["full"]["attention"]["every"] == 1


def test_float64_models_keep_their_precision_beside_a_float32_bound():
    torch.manual_seed(8)
    exact, bounded = Net(scale=3.0).double(), Net(sdpa=True).double()
    both = nn.ModuleDict({"a": exact, "b": bounded})
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    mon = gm.Monitor(both, probes=[AttentionProbe()])
    (exact(x).square().mean() + bounded(x).square().mean()).backward()
    mon.step()
    got, other = _reading(mon.trace, "a.attn"), _reading(mon.trace, "b.attn")
    mon.close()
    assert got["attn_logit_max"] == pytest.approx(_by_hand(*_qk(exact, x))[0], rel=1e-12)
    assert other["attn_logit_max"] == pytest.approx(_by_hand(*_qk(bounded, x))[2], rel=1e-5)


class GaussianAttention(nn.Module):
    """SDPA over the q, k, v it is given (stacked in one tensor), times a learnable gain: i.i.d. Gaussian q and k."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, qkv):
        q, k, v = qkv.unbind(0)
        return F.scaled_dot_product_attention(q * self.gain, k, v)


@pytest.mark.parametrize("seed", range(4))
def test_the_sdpa_bound_is_never_below_the_true_max_and_within_sqrt_dh_of_it_on_random_inputs(seed):
    # the bound max|q| max|k| / sqrt(dh) against the exact max logit q.k / sqrt(dh) in float64: Cauchy-Schwarz makes
    # it an upper bound; on i.i.d. Gaussian q and k it overshoots by about sqrt(dh / (2 ln pairs)) (a random pair's
    # cosine is ~1/sqrt(dh)), stated here within sqrt(dh) = 4 (measured 1.6-2.4x at dh 16, 2.5-3.6x at dh 64)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(3, 2, 4, 32, 16, generator=gen)  # (q/k/v, B, H, T, dh)
    model = nn.ModuleDict({"attn": GaussianAttention()})
    mon = gm.Monitor(model, probes=[AttentionProbe()])
    model["attn"](qkv).square().mean().backward()
    mon.step()
    got = _reading(mon.trace, "attn")["attn_logit_max"]
    mon.close()
    top, _, _ = _by_hand(qkv[0], qkv[1], causal=False)
    assert top > 0
    assert top * (1 - 1e-6) <= got <= math.sqrt(16) * top


def test_the_sdpa_bound_is_tight_where_queries_and_keys_align_as_when_logits_grow():
    # attention-logit growth is q and k lining up along a few directions (Wortsman et al. 2023; Dehghani et al. 2023):
    # there the bound is within 10% of the exact max
    torch.manual_seed(0)
    model, x = Net(sdpa=True), torch.randn(4, 12, 8)
    with torch.no_grad():
        u = torch.randn(16, 1)
        shared = 5.0 * u @ torch.randn(1, 16)  # rank one: every query and key along u
        model.attn.q.weight.copy_(shared + 0.01 * torch.randn(16, 16))
        model.attn.k.weight.copy_(shared + 0.01 * torch.randn(16, 16))
    got = _reading(_monitored(model, x), "attn")["attn_logit_max"]
    top, _, _ = _by_hand(*_qk(model, x), causal=True)
    assert top * (1 - 1e-6) <= got <= 1.1 * top
