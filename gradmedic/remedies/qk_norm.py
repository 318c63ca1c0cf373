"""QK-norm: normalise each head's queries and keys before their dot product, so the attention logits are bounded.

Attention logits q.k/sqrt(d) that grow without bound make the softmax one-hot and precede divergence (Dehghani et
al. 2023, ViT-22B; Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities":
QK-layernorm removed the instability at every learning rate they tried). With q and k normalised over the head's
``d`` channels and gains ``g_q``, ``g_k``, ``|q| <= max|g_q| sqrt(d)``, so ``|q.k| / sqrt(d) <= sqrt(d) max|g_q|
max|g_k|``: the logits can only grow as fast as the gains do.

``qk_norm_(model, inputs=None)`` finds every attention module by its structure and inserts the norm where the
module computes its queries and keys:

- **q_norm/k_norm placeholders** (timm's ``Attention(qk_norm=False)``, nanoGPT-like code written with an
  ``nn.Identity`` there): the ``nn.Identity`` is replaced by a ``QKNorm`` over the head dimension, a weight (and for
  LayerNorm a bias) of shape ``(head_dim,)``: the same keys and shapes as ``nn.RMSNorm(head_dim)`` /
  ``nn.LayerNorm(head_dim)``, so the state_dict loads into the user's class built with QK-norm on.
- **separate q and k projections** (Llama/Mistral/Qwen2/OPT/BART ``q_proj``/``k_proj``, BERT/ViT ``query``/``key``,
  DistilBERT ``q_lin``/``k_lin``, T5 ``q``/``k``: found by the projection role of ``gradmedic.architecture``): a
  ``QKNorm`` with a gain per head and channel becomes the projection's child ``qk_norm`` and a forward hook passes
  the projection's output through it. Llama-style RoPE comes after and rotates within each head, so the bound holds.
- **fused q|k|v projections** of a known layout: GPT-2's (and nanoGPT's) ``c_attn`` ([q | k | v], a Conv1D in GPT-2;
  GPT-2's cross-attention ``q_attn`` + ``c_attn`` [k | v]), GPT-NeoX's and BLOOM's ``query_key_value`` (per head
  [q k v]): a ``FusedQKNorm`` child and a hook, normalising the q and k parts only.
- **nn.MultiheadAttention** (and so ``TransformerEncoderLayer``, ``TransformerDecoderLayer``, ``nn.Transformer``):
  its class becomes ``QKNormMultiheadAttention`` (``_qk_mha.py``), parameters kept, ``q_norm``/``k_norm`` added; the
  layers holding it leave torch's fused inference path, which would skip the norms.

An attention module that has norms there already (Qwen3, OLMo 2, Gemma 3) is left as it is. Other fused layouts
(Falcon's multi-query ``query_key_value``, CodeGen's ``qkv_proj``) cannot be read from the structure and are refused:
add the norm in their own code.

**Not function-preserving, and it cannot be**: the norm divides each token's query and key by their own size, so
what the per-token sizes carried is gone. What is kept, with ``inputs``: each head's gain starts at the mean size
(the RMS, or for LayerNorm the standard deviation, over its channels) of that head's queries (keys) on the batch,
so a query or key of typical size is left exactly as it was and the logit scale at insertion matches the measured
one; the outliers the logit growth comes from are brought down to the typical size. Where every token's size equals
the mean (e.g. one query), the output is unchanged up to the norm's eps (tested). Without ``inputs`` the gains
start at 1, the papers' init, right for fresh weights.

**state_dict**: the norms' parameters are new keys (``...q_proj.qk_norm.weight``, ``...c_attn.qk_norm.q.weight``,
``...self_attn.q_norm.weight``); the existing keys are unchanged. To load a treated model's state_dict, build the
model as before, call ``qk_norm_(model, norm=...)`` on it (no inputs needed: the gains come from the state_dict),
then ``model.load_state_dict(state_dict)``. The hooks are on the module objects: ``copy.deepcopy`` and
``torch.save(model)`` keep them; a Hugging Face ``from_pretrained`` of the original class drops the norms' weights.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, GradmedicWarning, bad_argument
from gradmedic._inputs import run_forward
from gradmedic.architecture import is_attention, role_of
from gradmedic.remedies.qk_modules import EPS, NORMS, FusedQKNorm, QKNorm, QKNormMultiheadAttention

__all__ = ["qk_norm_"]

# placeholder pairs for a norm of queries and keys (an nn.Identity when the model was built without one)
_NORM_SLOTS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"), ("norm_q", "norm_k"),
               ("q_ln", "k_ln"))
_HEAD_DIM = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim", "d_head", "dim_head", "d_k", "dh")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "nheads", "num_head")
_WIDTH = ("embed_dim", "all_head_size", "inner_dim", "hidden_size", "n_embd", "d_model", "dim")
# fused q|k|v projections whose layout is known: leaf name -> (layout, class-name pattern the owner must match)
_FUSED = {"c_attn": ("blocks", re.compile(r"")), "query_key_value": ("heads", re.compile(r"GPTNeoX|Bloom"))}


class _NormOutput:
    """Forward hook: the module's output through its ``qk_norm`` child (a class, not a closure: picklable)."""

    def __call__(self, module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return module.qk_norm(output)


def _head_dim(attn: nn.Module, given: int | None) -> int | None:
    if given is not None:
        return given
    for name in _HEAD_DIM:
        value = getattr(attn, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    heads = next((getattr(attn, n) for n in _HEADS if isinstance(getattr(attn, n, None), int)), None)
    width = next((getattr(attn, n) for n in _WIDTH if isinstance(getattr(attn, n, None), int)), None)
    if heads and width and width % heads == 0:
        return width // heads
    config = getattr(attn, "config", None)
    if isinstance(getattr(config, "head_dim", None), int):
        return config.head_dim
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    known = isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads == 0
    return width // heads if known else None


def _param_like(module: nn.Module) -> dict[str, Any]:
    p = next((t for t in module.parameters() if t.is_floating_point()), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


def _out_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):  # transformers' Conv1D: (in, out)
        return int(weight.shape[1])
    return getattr(module, "out_features", None)


class _Plan:
    """What ``qk_norm_`` does to one attention module: ``watch`` holds (module, hook) pairs that collect the sizes
    the gains start from in the measuring forward, ``apply`` makes the change (gains measured, or 1)."""

    def __init__(self, name: str, how: str):
        self.name, self.how = name, how
        self.watch: list[tuple[nn.Module, Callable]] = []
        self.apply: Callable[[], None] = lambda: None


def _sizes(x: torch.Tensor, head_dim: int, norm: str) -> torch.Tensor:
    """Per token and head, what the norm divides by: (..., n)."""
    y = x.detach().float().unflatten(-1, (-1, head_dim))
    if norm == "layer":
        y = y - y.mean(-1, keepdim=True)
    return y.square().mean(-1).sqrt()


class _Sizes:
    """Sums of the per-head sizes a norm will see, over the measuring forward."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, key: str, sizes: torch.Tensor, per_head: bool) -> None:
        flat = sizes.reshape(-1, sizes.shape[-1]) if per_head else sizes.reshape(-1, 1)
        self.total[key] = self.total.get(key, 0) + flat.sum(0)
        self.count[key] = self.count.get(key, 0) + flat.shape[0]

    def mean(self, key: str) -> torch.Tensor | None:
        return self.total[key] / self.count[key] if key in self.total else None


def _set_gain(norm: QKNorm, gain: torch.Tensor | None) -> None:
    if gain is None:
        return
    with torch.no_grad():
        g = gain.to(norm.weight.device, norm.weight.dtype)
        norm.weight.copy_(g.view(-1, 1).expand_as(norm.weight) if norm.weight.dim() == 2 else g.expand_as(norm.weight))


def _plan_slots(name: str, attn: nn.Module, slots: tuple[str, str], head_dim: int, norm: str, eps: float,
                sizes: _Sizes) -> _Plan:
    plan = _Plan(name, f"{slots[0]}/{slots[1]} placeholders replaced by QKNorm(head_dim={head_dim})")
    empty = [s for s in slots if isinstance(getattr(attn, s), nn.Identity)]
    for slot in empty:
        plan.watch.append((getattr(attn, slot), lambda m, a, out, key=f"{name}.{slot}":
                           sizes.add(key, _sizes(out, head_dim, norm), per_head=False)))

    def apply() -> None:
        like = _param_like(attn)
        for slot in empty:
            module = QKNorm(head_dim, None, norm, eps, **like)
            _set_gain(module, sizes.mean(f"{name}.{slot}"))
            setattr(attn, slot, module)
    plan.apply = apply
    return plan


def _plan_hooked(name: str, proj: nn.Module, make: Callable[[], nn.Module], measure: Callable[[torch.Tensor], None],
                 gains: Callable[[nn.Module], None], how: str) -> _Plan:
    """A norm as the projection's child ``qk_norm``, applied to its output by a forward hook."""
    plan = _Plan(name, how)
    plan.watch.append((proj, lambda m, a, out: measure(out)))

    def apply() -> None:
        norm = make()
        gains(norm)
        proj.add_module("qk_norm", norm)
        proj.register_forward_hook(_NormOutput())
    plan.apply = apply
    return plan


def _plan_projections(name: str, attn: nn.Module, head_dim: int, norm: str, eps: float, sizes: _Sizes) -> list[_Plan]:
    children = [(f"{name}.{c}" if name else c, c, m) for c, m in attn.named_children()]
    roles = {c: role_of(full, m) for full, c, m in children}
    modules = dict(attn.named_children())
    q = [c for c, r in roles.items() if r == "attn_q"]
    k = [c for c, r in roles.items() if r == "attn_k"]
    fused = [c for c, r in roles.items() if r == "attn_qkv"]
    plans: list[_Plan] = []
    if len(q) == 1 and len(k) == 1 and not fused:
        for part, child in (("q", q[0]), ("k", k[0])):
            proj = modules[child]
            width = _out_width(proj)
            if width is None or width % head_dim:
                raise GradmedicError(f"'{name}.{child}' gives {width} channels, not a multiple of head_dim {head_dim}: "
                                     "pass head_dim= to qk_norm_")
            key = f"{name}.{child}"
            plans.append(_plan_hooked(
                name, proj,
                lambda w=width, p=proj: QKNorm(head_dim, w // head_dim, norm, eps, **_param_like(p)),
                lambda out, key=key: sizes.add(key, _sizes(out, head_dim, norm), per_head=True),
                lambda m, key=key: _set_gain(m, sizes.mean(key)), f"{part} projection '{child}' hooked"))
        return plans
    if len(fused) == 1:
        child = fused[0]
        layout, owner_class = _FUSED.get(child, (None, None))
        if layout is None or not owner_class.search(type(attn).__name__):
            raise GradmedicError(f"'{name}' fuses q, k and v in '{child}' in a layout gradmedic cannot read from the "
                                 "structure: add the norm of queries and keys in its own code")
        proj = modules[child]
        width = _out_width(proj)
        cross_q = modules.get("q_attn") if getattr(attn, "is_cross_attention", False) else None
        parts = ("k", "v") if cross_q is not None else ("q", "k", "v")
        if width is None or width % (len(parts) * head_dim):
            raise GradmedicError(f"'{name}.{child}' gives {width} channels, not {len(parts)} x heads x {head_dim}")
        heads = width // (len(parts) * head_dim)
        key, splitter = f"{name}.{child}", FusedQKNorm(layout, parts, heads, head_dim)

        def measure(out: torch.Tensor, key: str = key) -> None:
            for part, piece in zip(parts, splitter.split(out), strict=True):
                if part != "v":
                    sizes.add(f"{key}.{part}", _sizes(piece, head_dim, norm), per_head=True)

        def gains(module: nn.Module, key: str = key) -> None:
            for part in ("q", "k"):
                if part in parts:
                    _set_gain(getattr(module, part), sizes.mean(f"{key}.{part}"))
        plans.append(_plan_hooked(name, proj,
                                  lambda: FusedQKNorm(layout, parts, heads, head_dim, norm, eps, **_param_like(proj)),
                                  measure, gains, f"fused '{child}' ({layout}) hooked"))
        if cross_q is not None:
            qkey = f"{name}.q_attn"
            plans.append(_plan_hooked(
                name, cross_q, lambda: QKNorm(head_dim, heads, norm, eps, **_param_like(cross_q)),
                lambda out: sizes.add(qkey, _sizes(out, head_dim, norm), per_head=True),
                lambda m: _set_gain(m, sizes.mean(qkey)), "q projection 'q_attn' hooked"))
        return plans
    raise GradmedicError(f"'{name}' ({type(attn).__name__}): no query and key projections found "
                         f"(children: {', '.join(modules) or 'none'}); add the norm in its own code")


def _plan_mha(name: str, attn: nn.MultiheadAttention, norm: str, eps: float, sizes: _Sizes) -> _Plan:
    plan = _Plan(name, "nn.MultiheadAttention -> QKNormMultiheadAttention")
    head_dim = attn.head_dim

    def measure(module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        if query.dim() == 3 and not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        if module._qkv_same_embed_dim:
            w_q, w_k, _ = module.in_proj_weight.chunk(3)
        else:
            w_q, w_k = module.q_proj_weight, module.k_proj_weight
        b_q, b_k, _ = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for part, x, w, b in (("q", query, w_q, b_q), ("k", key, w_k, b_k)):
                sizes.add(f"{name}.{part}", _sizes(nn.functional.linear(x, w, b), head_dim, norm), per_head=True)
    plan.watch.append((attn, measure))

    def apply() -> None:
        like = _param_like(attn)
        attn.__class__ = QKNormMultiheadAttention
        for part in ("q", "k"):
            module = QKNorm(head_dim, attn.num_heads, norm, eps, **like)
            _set_gain(module, sizes.mean(f"{name}.{part}"))
            attn.add_module(f"{part}_norm", module)
    plan.apply = apply
    return plan


def _already(attn: nn.Module) -> bool:
    if isinstance(attn, QKNormMultiheadAttention):
        return True
    if any(isinstance(getattr(m, "qk_norm", None), (QKNorm, FusedQKNorm)) for m in attn.children()):
        return True
    return any(all(isinstance(getattr(attn, s, None), nn.Module) and not isinstance(getattr(attn, s), nn.Identity)
                   for s in slots) for slots in _NORM_SLOTS)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) or is_attention(m)]


def qk_norm_(model: nn.Module, inputs: Any = None, norm: str = "rms", eps: float = EPS,
             head_dim: int | None = None) -> dict[str, str]:
    """Insert QK-norm into every attention module of ``model``, in place (see the module docstring for where and
    how, what is and is not preserved, and how to load the state_dict). ``inputs``: a batch to measure the gains
    at insertion from (the logit scale at insertion matches the measured one), else the gains start at 1.
    ``norm``: ``"rms"`` (RMSNorm: no mean removed, the closer to the model's function) or ``"layer"``
    (LayerNorm, as Dehghani et al. 2023). ``head_dim``: the width of one head, when the attention module does not
    say it. Returns {attention module: what was done}; an attention module with QK-norm already is left alone;
    raises ``GradmedicError`` when no attention module could be treated."""
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    if norm not in NORMS:
        raise bad_argument("norm", f"one of {NORMS}", norm)
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise bad_argument("head_dim", "None or a positive int (the width of one attention head)", head_dim)
    found = _attention_modules(model)
    if not found:
        raise GradmedicError("qk_norm_ found no attention module (nn.MultiheadAttention or a class named "
                             "...Attention/...Attn) in the model")
    sizes, plans, refused, done = _Sizes(), [], {}, {}
    for name, attn in found:
        if _already(attn):
            continue
        try:
            if isinstance(attn, nn.MultiheadAttention):
                plans.append(_plan_mha(name, attn, norm, eps, sizes))
                continue
            dim = _head_dim(attn, head_dim)
            if dim is None:
                raise GradmedicError(f"'{name}' does not say its head width: pass head_dim= to qk_norm_")
            slots = next((s for s in _NORM_SLOTS if all(hasattr(attn, n) for n in s)), None)
            if slots is not None and any(isinstance(getattr(attn, n), nn.Identity) for n in slots):
                plans.append(_plan_slots(name, attn, slots, dim, norm, eps, sizes))
            else:
                plans.extend(_plan_projections(name, attn, dim, norm, eps, sizes))
        except GradmedicError as why:
            refused[name] = str(why)
    if inputs is not None and plans:
        _measure(model, inputs, plans)
    for plan in plans:
        plan.apply()
        done[plan.name] = "; ".join(p.how for p in plans if p.name == plan.name)
    for layer in model.modules():  # torch's fused encoder path reads in_proj_weight itself and would skip the norms
        if isinstance(layer, nn.TransformerEncoderLayer) and isinstance(layer.self_attn, QKNormMultiheadAttention):
            layer.activation_relu_or_gelu = 0
    if not done and refused:
        raise GradmedicError("qk_norm_ could not treat any attention module: " + "; ".join(refused.values()))
    if refused:
        warnings.warn("qk_norm_ left " + "; ".join(refused.values()), GradmedicWarning, stacklevel=2)
    return done


def _measure(model: nn.Module, inputs: Any, plans: list[_Plan]) -> None:
    handles = []
    for plan in plans:
        for module, hook in plan.watch:
            if isinstance(module, nn.MultiheadAttention):
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
