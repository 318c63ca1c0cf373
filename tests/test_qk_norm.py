"""QK-norm (``gradmedic.remedies.qk_norm_``): the norm against float64 by hand; the attention logits bounded by
sqrt(d) x max|g_q| x max|g_k| after insertion, computed independently from the projections (and the attention the
model returns equal to the softmax of those logits); torch's MultiheadAttention re-written (norms off) equal to
torch's own; the output unchanged where the insertion claims it; device, dtype, state_dict, pickling; and a seeded
GPT run that diverges from attention-logit growth does not after it."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmedic import GradmedicError
from gradmedic.remedies import QKNorm, QKNormMultiheadAttention, qk_norm_
from gradmedic.remedies.actions import ACTIONS, TIERS, Patient
from tests import training_runs as corpus


def hand_norm(x: torch.Tensor, weight: torch.Tensor, head_dim: int, norm: str, eps: float, bias=None) -> torch.Tensor:
    """The norm per head in float64, written out: (x - mean) / sqrt(mean square + eps) * weight."""
    y = x.double().reshape(*x.shape[:-1], -1, head_dim)
    if norm == "layer":
        y = y - y.mean(-1, keepdim=True)
    y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + eps) * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(x.shape)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("heads", [None, 3])
def test_qknorm_matches_float64_by_hand(norm, heads):
    torch.manual_seed(0)
    module = QKNorm(8, heads, norm)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        if module.bias is not None:
            module.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 5, 24) * 7 + 1
    expected = hand_norm(x, module.weight, 8, norm, module.eps, module.bias)
    torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-5)
    if heads is None:  # shared over heads: works on a tensor already split into heads too
        torch.testing.assert_close(module(x.view(2, 5, 3, 8)).reshape(2, 5, 24), module(x))
    # float16 in, float16 out, computed in float32
    assert module.half()(x.half()).dtype == torch.float16


def blow_up(module: nn.Module, factor: float = 30.0) -> None:
    """Scale the query and key weights up, as attention-logit growth does: the logits would reach thousands."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in ("in_proj_weight", "q_proj", "k_proj", "query.weight", "key.weight",
                                       "c_attn.weight", "query_key_value.weight", ".q.weight", ".k.weight")):
                p.mul_(factor)


def bound(q_norm: QKNorm, k_norm: QKNorm, head_dim: int) -> float:
    return math.sqrt(head_dim) * float(q_norm.weight.detach().abs().max()) * float(k_norm.weight.detach().abs().max())


def test_multihead_attention_logits_bounded_and_weights_from_normalised_q_k():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    blow_up(mha)
    x = torch.randn(3, 10, 32)
    w_q, w_k, _ = mha.in_proj_weight.detach().double().chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.detach().double().chunk(3)
    raw = (F.linear(x.double(), w_q, b_q).view(3, 10, 4, 8).transpose(1, 2) @
           F.linear(x.double(), w_k, b_k).view(3, 10, 4, 8).transpose(1, 2).transpose(-2, -1)) / math.sqrt(8)
    assert raw.abs().max() > 100  # without QK-norm
    done = qk_norm_(mha, (x, x, x))  # the measuring batch: MultiheadAttention's (query, key, value)
    assert isinstance(mha, QKNormMultiheadAttention) and list(done) == [""]
    q = hand_norm(F.linear(x.double(), w_q, b_q), mha.q_norm.weight, 8, "rms", mha.q_norm.eps)
    k = hand_norm(F.linear(x.double(), w_k, b_k), mha.k_norm.weight, 8, "rms", mha.k_norm.eps)
    logits = q.view(3, 10, 4, 8).transpose(1, 2) @ k.view(3, 10, 4, 8).transpose(1, 2).transpose(-2, -1) / math.sqrt(8)
    assert logits.abs().max() <= bound(mha.q_norm, mha.k_norm, 8) * (1 + 1e-6)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(weights.double(), logits.softmax(-1), rtol=1e-4, atol=1e-5)


def gpt2(**extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, **extra)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_fused_c_attn_logits_bounded_and_the_model_attends_with_them():
    model = gpt2(attn_implementation="eager")
    blow_up(model)
    ids = torch.randint(0, 50, (2, 9))
    inputs = {}
    model.transformer.h[0].attn.c_attn.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0].detach()))
    qk_norm_(model, ids)
    out = model(ids, output_attentions=True)
    attn = model.transformer.h[0].attn
    c_attn = attn.c_attn  # Conv1D: x @ weight + bias, weight (in, 3 * out)
    qkv = inputs["x"].double() @ c_attn.weight.detach().double() + c_attn.bias.detach().double()
    q_raw, k_raw, _ = qkv.split(32, -1)
    q = hand_norm(q_raw, c_attn.qk_norm.q.weight, 8, "rms", 1e-6)
    k = hand_norm(k_raw, c_attn.qk_norm.k.weight, 8, "rms", 1e-6)
    logits = q.view(2, 9, 4, 8).transpose(1, 2) @ k.view(2, 9, 4, 8).transpose(1, 2).transpose(-2, -1) / math.sqrt(8)
    assert logits.abs().max() <= bound(c_attn.qk_norm.q, c_attn.qk_norm.k, 8) * (1 + 1e-6)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    expected = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(out.attentions[0].double(), expected, rtol=1e-4, atol=1e-5)
    # the logit scale at insertion is the measured one: each head's mean query size is what it was
    sizes_before = q_raw.view(2, 9, 4, 8).norm(dim=-1).mean((0, 1))
    sizes_after = q.view(2, 9, 4, 8).norm(dim=-1).mean((0, 1))
    torch.testing.assert_close(sizes_after, sizes_before, rtol=1e-4, atol=0)


def largest_logit(model: nn.Module, inputs, q_mod: nn.Module, k_mod: nn.Module, head_dim: int) -> float:
    """The largest |q.k|/sqrt(d) per head from the projections' outputs as the attention receives them (after QK-norm's
    hook). RoPE (Llama) rotates within a head after this, which keeps every |q| and |k|, and so the bound."""
    seen = {}
    handles = [q_mod.register_forward_hook(lambda m, a, o: seen.update(q=o.detach().double())),
               k_mod.register_forward_hook(lambda m, a, o: seen.update(k=o.detach().double()))]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    q, k = seen["q"].unflatten(-1, (-1, head_dim)), seen["k"].unflatten(-1, (-1, head_dim))
    k = k.repeat_interleave(q.shape[-2] // k.shape[-2], dim=-2)  # grouped-query attention
    return float((torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)).abs().max())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hugging_face_q_k_projections_bounded(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=64))
        attn = model.encoder.layer[0].attention.self
        q_mod, k_mod = attn.query, attn.key
    else:
        model = transformers.LlamaModel(transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, num_key_value_heads=2,
                                                                 intermediate_size=64))
        attn = model.layers[0].self_attn
        q_mod, k_mod = attn.q_proj, attn.k_proj
    blow_up(model, 100.0)
    inputs = {"input_ids": torch.randint(0, 50, (2, 7))}
    assert largest_logit(model, inputs, q_mod, k_mod, 8) > 100  # without QK-norm
    done = qk_norm_(model, inputs)
    assert len(done) == 2
    assert largest_logit(model, inputs, q_mod, k_mod, 8) <= bound(q_mod.qk_norm, k_mod.qk_norm, 8) * (1 + 1e-6)
    model.train()
    model(**inputs).last_hidden_state.sum().backward()
    assert q_mod.qk_norm.weight.grad is not None and torch.isfinite(q_mod.qk_norm.weight.grad).all()


def mha_cases():
    yield "batch_first", dict(batch_first=True), dict()
    yield "seq_first", dict(), dict()
    yield "bias_kv_zero_attn", dict(batch_first=True, add_bias_kv=True, add_zero_attn=True), dict()
    yield "kdim_vdim", dict(batch_first=True, kdim=12, vdim=20), dict()
    yield "bool_mask_padding", dict(batch_first=True), dict(attn_mask="bool2d", key_padding_mask=True)
    yield "float_mask_3d", dict(batch_first=True), dict(attn_mask="float3d")
    yield "causal", dict(batch_first=True), dict(attn_mask="causal", is_causal=True)
    yield "weights_per_head", dict(batch_first=True), dict(average_attn_weights=False)
    yield "no_weights", dict(batch_first=True, add_bias_kv=True), dict(need_weights=False, key_padding_mask=True)
    yield "unbatched", dict(), dict(unbatched=True)


@pytest.mark.parametrize("case", list(mha_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_multihead_attention_rewritten_equals_torch_with_norms_off(case, mode):
    """With q_norm/k_norm set to the identity, the subclass's forward is torch's (masks, bias_k, zero attention,
    kdim/vdim, both layouts, unbatched, with and without weights), in training and in eval (torch's fast path)."""
    _, kwargs, call = case
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **kwargs)
    getattr(mha, mode)()
    twin = copy.deepcopy(mha)
    qk_norm_(twin)
    twin.q_norm, twin.k_norm = nn.Identity(), nn.Identity()
    n, length, size = 2, 5, 6
    seq_first = not kwargs.get("batch_first")
    def make(width, steps):
        if call.get("unbatched"):
            return torch.randn(steps, width)
        return torch.randn(steps, n, width) if seq_first else torch.randn(n, steps, width)
    query = make(16, length)
    key, value = make(kwargs.get("kdim", 16), size), make(kwargs.get("vdim", 16), size)
    args = {}
    if call.get("attn_mask") == "bool2d":
        args["attn_mask"] = torch.rand(length, size) > 0.7
        args["attn_mask"][:, 0] = False
    elif call.get("attn_mask") == "float3d":
        args["attn_mask"] = torch.randn(n * 4, length, size)
    elif call.get("attn_mask") == "causal":
        key, value = make(16, length), make(16, length)
        args["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        args["is_causal"] = True
    if call.get("key_padding_mask"):
        mask = torch.zeros(n, size, dtype=torch.bool)
        mask[0, -2:] = True
        args["key_padding_mask"] = mask
    for name in ("need_weights", "average_attn_weights"):
        if name in call:
            args[name] = call[name]
    with torch.no_grad():
        out, weights = mha(query, key, value, **args)
        out2, weights2 = twin(query, key, value, **args)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    assert (weights is None) == (weights2 is None)
    if weights is not None:
        torch.testing.assert_close(weights2, weights, rtol=1e-5, atol=1e-6)


def test_output_unchanged_where_every_query_and_key_has_the_mean_size():
    """The claim of function preservation at insertion: a query or key of the batch's mean size per head is left
    as it is. One head, orthogonal projections without bias and unit-norm inputs give every token the same size:
    the output is the same up to the norm's eps."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 1, bias=False, batch_first=True).eval()
    with torch.no_grad():
        q_w = torch.linalg.qr(torch.randn(8, 8))[0] * 3.0
        k_w = torch.linalg.qr(torch.randn(8, 8))[0] * 0.5
        mha.in_proj_weight[:8], mha.in_proj_weight[8:16] = q_w, k_w
    x = F.normalize(torch.randn(4, 6, 8), dim=-1)
    with torch.no_grad():
        before = mha(x, x, x)[0]
    qk_norm_(mha, (x, x, x))
    with torch.no_grad():
        after = mha(x, x, x)[0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # the gains are the sizes measured: RMS 3 / sqrt(8) and 0.5 / sqrt(8)
    torch.testing.assert_close(mha.q_norm.weight, torch.full((1, 8), 3.0 / math.sqrt(8)), rtol=1e-5, atol=0)
    torch.testing.assert_close(mha.k_norm.weight, torch.full((1, 8), 0.5 / math.sqrt(8)), rtol=1e-5, atol=0)


def test_transformer_layers_run_forward_backward_and_leave_the_fast_path():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    decoder = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    assert len(qk_norm_(encoder)) == 2 and len(qk_norm_(decoder)) == 2  # self- and cross-attention
    encoder(x).sum().backward()
    decoder(x, memory).sum().backward()
    assert all(layer.self_attn.q_norm.weight.grad is not None for layer in encoder.layers)
    # eval, no grad: the fused path would skip the norms; with them at 0 the output must show it
    encoder.eval()
    with torch.no_grad():
        for layer in encoder.layers:
            layer.self_attn.k_norm.weight.zero_()  # every logit 0: uniform attention
        out = encoder(x)
        uniform = copy.deepcopy(encoder)
        for layer in uniform.layers:
            layer.self_attn.q_norm = layer.self_attn.k_norm = nn.Identity()
            layer.self_attn.in_proj_weight[16:32].zero_()
            layer.self_attn.in_proj_bias[16:32].zero_()
        torch.testing.assert_close(out, uniform(x), rtol=1e-5, atol=1e-5)
    transformer = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    assert len(qk_norm_(transformer)) == 3
    assert transformer(torch.randn(2, 5, 16), torch.randn(2, 4, 16)).shape == (2, 4, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_kept(dtype):
    torch.manual_seed(0)
    model = corpus.GPT().to(dtype)
    ids = torch.randint(0, corpus.VOCAB, (2, 16))
    qk_norm_(model, ids)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = model(ids)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    mha = nn.MultiheadAttention(16, 2, batch_first=True).to(dtype)
    qk_norm_(mha)
    assert mha.q_norm.weight.dtype == dtype and mha(*(torch.randn(1, 3, 16, dtype=dtype),) * 3)[0].dtype == dtype


def test_state_dict_loads_into_the_users_class():
    # placeholders (the corpus GPT, built with q_norm/k_norm = nn.Identity): with norm="layer" the keys and shapes
    # are those of the same class built with QK-norm, nn.LayerNorm(head_dim)
    torch.manual_seed(0)
    model = corpus.GPT()
    ids = torch.randint(0, corpus.VOCAB, (2, 16))
    qk_norm_(model, ids, norm="layer")
    users = corpus.GPT(qk_norm=True)
    users.load_state_dict(model.state_dict())  # strict
    torch.testing.assert_close(users(ids), model(ids))
    # any model: build it again, qk_norm_ it (no inputs), load
    model = gpt2()
    ids = torch.randint(0, 50, (2, 7))
    qk_norm_(model, ids)
    fresh = gpt2()
    qk_norm_(fresh)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    assert "transformer.h.0.attn.c_attn.qk_norm.q.weight" in model.state_dict()
    # pickled whole and deep-copied, the hooks come along
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    torch.testing.assert_close(copy.deepcopy(model)(ids).logits, model(ids).logits)


def test_again_changes_nothing_and_refusals_name_the_fix():
    torch.manual_seed(0)
    model = corpus.GPT()
    ids = torch.randint(0, corpus.VOCAB, (2, 16))
    assert len(qk_norm_(model)) == 2
    with torch.no_grad():
        out = model(ids)
    assert qk_norm_(model) == {}
    torch.testing.assert_close(model(ids), out)
    with pytest.raises(GradmedicError, match="no attention module"):
        qk_norm_(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(GradmedicError, match="norm"):
        qk_norm_(model, norm="batch")
    transformers = pytest.importorskip("transformers")
    falcon = transformers.FalconModel(transformers.FalconConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4))
    with pytest.raises(GradmedicError, match="layout"):
        qk_norm_(falcon)


def test_action_registered_and_applies_on_fresh_weights():
    assert ACTIONS["qk_norm"].tier == TIERS["insert"] and ACTIONS["qk_norm"].on == "model"
    torch.manual_seed(0)
    model = corpus.GPT()
    text = ACTIONS["qk_norm"].apply(Patient(model, trained=False))
    assert "2 attention module(s)" in text and isinstance(model.blocks[0].attn.q_norm, QKNorm)
    assert bool((model.blocks[0].attn.q_norm.weight == 1).all())  # fresh: the papers' init


def test_a_run_that_diverges_from_attention_logit_growth_does_not_after_qk_norm(one_thread):
    run = corpus.by_name("attention_logit_growth_gpt")
    untreated = corpus.run(run)
    assert untreated.failure_step is not None and untreated.fired["attention_logits"] < run.recipe.steps
    model, _ = corpus.build(run)
    qk_norm_(model)
    treated = corpus.run(run, model=model)
    assert treated.failure_step is None, treated.fired
    # the logits measured by the corpus's own hooks (after the norm) stay under the bound sqrt(16) g_q g_k, which
    # the gains could raise as they learn; in this run they stay in the tens
    assert max(treated.signals["attention_logit"]) < 100
    assert treated.final_loss < 0.1 * untreated.final_loss
