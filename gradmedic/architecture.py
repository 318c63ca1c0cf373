"""The one table of architecture knowledge: what a module *is* in the model it sits in.

Probes, rules and remedies all need to know which modules are activations, normalisations, residual
blocks, attention projections, MLP layers and embeddings, for ``torch.nn`` and for the model zoos people
actually train (Hugging Face ``transformers``, timm-like CNNs). That knowledge lives here and nowhere
else, keyed by class *names* and attribute names, so that ``import gradmedic`` imports no framework.

Roles (``role_of``):

=============== ==============================================================================
``activation``  an activation module (``nn.ReLU``, HF's ``GELUActivation``, ``NewGELUActivation``...)
``norm``        BatchNorm/LayerNorm/GroupNorm/RMSNorm and the zoos' own (``LlamaRMSNorm``, ``T5LayerNorm``)
``embedding``   token/position/patch embeddings
``block``       a residual block: the unit whose input and output lie on the residual stream
``attn_q``      attention query projection (``attn_k``, ``attn_v``, ``attn_qkv`` when fused, ``attn_out``)
``attention``   the module that computes attention weights: ``nn.MultiheadAttention`` (it owns q/k/v as
                ``in_proj_weight``), and the innermost class named ``...Attention``/``...Attn`` (``is_attention``)
``mlp_in``      the first (expanding) projection of a block's MLP, ``mlp_out`` the last (projecting back)
``recurrent``   ``nn.RNN``/``LSTM``/``GRU`` and their cells
``conv``, ``linear``, ``other``
=============== ==============================================================================

Wrappers (``torch.compile``'s ``OptimizedModule``, DDP, DataParallel, FSDP) are not part of the model:
``unwrap`` takes them off the root (DDP's ``module.``) and ``clean_name`` drops the segments they add
inside (``_orig_mod`` of a compiled submodule, FSDP's), so every name gradmedic produces is the one
``model.named_modules()`` gives on the user's own model.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["ACTIVATION_KINDS", "ROLES", "WRAPPER_TYPES", "activation_kind", "block_index", "class_name",
           "clean_name", "is_attention", "is_block", "is_norm", "model_kind", "own_parameters", "parametrization_parts",
           "role_of", "roles", "stream_blocks", "unwrap"]

ROLES = ("activation", "norm", "embedding", "block", "attention", "attn_q", "attn_k", "attn_v", "attn_qkv",
         "attn_out", "mlp_in", "mlp_out", "recurrent", "conv", "linear", "other")

# --- activations ------------------------------------------------------------------------------------
# class name -> kind: "saturating" (sigmoid/tanh-like: derivative -> 0 at both ends), "relu" (a zero
# region with zero gradient: units can die), "smooth" (neither). Class names, not classes, so that the
# transformers ones are known without importing transformers.
ACTIVATION_KINDS: dict[str, str] = {
    # torch.nn
    "Sigmoid": "saturating", "Tanh": "saturating", "Hardtanh": "saturating", "Softsign": "saturating",
    "Hardsigmoid": "saturating", "LogSigmoid": "saturating",
    "ReLU": "relu", "ReLU6": "relu",
    "LeakyReLU": "smooth", "PReLU": "smooth", "RReLU": "smooth", "ELU": "smooth", "SELU": "smooth",
    "CELU": "smooth", "GELU": "smooth", "SiLU": "smooth", "Mish": "smooth", "Softplus": "smooth",
    "Hardswish": "smooth", "Tanhshrink": "smooth", "Softshrink": "smooth", "Hardshrink": "smooth",
    # transformers.activations (ACT2CLS); LinearActivation is the identity and is not an activation
    "GELUActivation": "smooth", "NewGELUActivation": "smooth", "FastGELUActivation": "smooth",
    "QuickGELUActivation": "smooth", "AccurateGELUActivation": "smooth", "ClippedGELUActivation": "smooth",
    "GELUTanh": "smooth", "PytorchGELUTanh": "smooth", "SiLUActivation": "smooth", "MishActivation": "smooth",
    "LaplaceActivation": "smooth", "SqrtSoftplusActivation": "smooth", "XIELUActivation": "smooth",
    "ReLUSquaredActivation": "relu",
    # timm
    "GELUTanhApprox": "smooth", "Swish": "smooth", "HardSwish": "smooth", "HardSigmoid": "saturating",
}


# The rectifier family, by class name: the activations He init is derived for (a gain of sqrt(2), or the leaky
# variant's), whether or not their units can die. A different question from ACTIVATION_KINDS's "relu", which is the
# units that can die (an exact zero region): LeakyReLU is a rectifier whose units cannot die, so it is "smooth"
# there and a rectifier here.
RECTIFIERS = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU"})

# The saturating activations as torch classes, for the remedies that find and replace them as modules
SATURATING_TYPES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)


def activation_kind(module: nn.Module) -> str | None:
    """"saturating", "relu", "smooth", or None when ``module`` is not an activation."""
    for cls in type(module).__mro__:
        kind = ACTIVATION_KINDS.get(cls.__name__)
        if kind is not None:
            return kind
        if cls is nn.Module:
            break
    return None


# --- normalisation ----------------------------------------------------------------------------------
# BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm2d, RMSNorm, and the zoos' own
# (LlamaRMSNorm, T5LayerNorm, ConvNextLayerNorm, MambaRMSNormGated, FrozenBatchNorm2d, ...)
_NORM_NAME = re.compile(r"(Norm|Norm[123]d|NormGated)$")

# torch's normalisation classes, for the remedies that find or insert them
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

# torch's normalisation layers by class name: how a trace that carries no roles (an older file) is read
TORCH_NORM_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d",
                              "InstanceNorm2d", "RMSNorm", "SyncBatchNorm"})


# ...except a layer named for what it is not: MobileBERT's NoNorm is a scale and a shift, nothing normalised, so
# its activations keep whatever scale the layers give them (1e-3 at init) and a model of them is not normalised
_NOT_NORM_NAME = re.compile(r"^(No|Identity)Norm$")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or a class named ``...Norm`` that holds no attention and no stack of layers
    (Wav2Vec2's ``EncoderLayerStableLayerNorm`` is an encoder layer and its ``EncoderStableLayerNorm`` an encoder,
    named for where they put their norms; an adaptive norm's own Linear is fine)."""
    name = type(module).__name__
    if isinstance(module, NORM_TYPES):
        return True
    if not _NORM_NAME.search(name) or _NOT_NORM_NAME.search(name):
        return False
    return not any(isinstance(m, (nn.ModuleList, nn.MultiheadAttention)) or _ATTENTION_CHILD.search(n)
                   for n, m in module.named_modules() if m is not module)


# --- residual blocks --------------------------------------------------------------------------------
# Known residual blocks by class name. The transformers ones: GPT2Block, LlamaDecoderLayer, BertLayer,
# BartEncoderLayer, T5Block, ViTLayer, SwinLayer, ConvNextLayer, ResNetBottleNeckLayer, MambaBlock,
# MobileNetV2InvertedResidual, EfficientNetBlock; torch's TransformerEncoderLayer/DecoderLayer.
_BLOCK_NAME = re.compile(r"(Block|DecoderLayer|EncoderLayer|BottleNeckLayer|BasicLayer|InvertedResidual|"
                         r"ConvNextLayer|ConvNextV2Layer)(StableLayerNorm)?$")  # Wav2Vec2/HuBERT/WavLM's pre-LN
# "...Layer" classes are blocks when they hold an attention module (BertLayer, ViTLayer, GPTNeoXLayer)
_ATTENTION_CHILD = re.compile(r"attn|attention", re.IGNORECASE)
# ...but not the sub-layers of a block (T5LayerSelfAttention, T5LayerFF: residual pieces of a T5Block), nor a
# squeeze-excitation gate, which multiplies its input by a gate rather than adding a branch to it (RegNet's
# RegNetSELayer holds its gate under the name "attention", and sits inside the real block, RegNetYLayer)
_NOT_BLOCK_NAME = re.compile(r"(Attention|FF|SelfAttention|CrossAttention|ConvLayer|Embeddings?|SELayer|SEBlock|"
                             r"SqueezeExcitation\w*)$")


def _has_params_below(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# --- parametrizations ---------------------------------------------------------------------------------
# ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``) moves a
# layer's weight into ``layer.parametrizations.weight.original`` (``original0``/``original1`` for weight norm's
# magnitude and direction) and computes ``layer.weight`` from it at every use. The modules under
# ``parametrizations`` are the weight's arithmetic, not layers: their output is a weight, so a probe hooked there
# reads dL/dW as if it were a signal on the data path, and the layer itself is left owning its bias alone. So they
# are no layer of their own, and their parameters belong to the layer (``own_parameters``).


def _parametrizations(module: nn.Module) -> nn.ModuleDict | None:
    """The ``parametrizations`` ModuleDict of a parametrized module, or None."""
    found = module.__dict__.get("_modules", {}).get("parametrizations")
    return found if isinstance(found, nn.ModuleDict) and type(module).__name__.startswith("Parametrized") else None


def class_name(module: nn.Module) -> str:
    """The class name the user wrote: ``Conv2d`` for a parametrized conv, whose class parametrize made on the fly
    (``ParametrizedConv2d``, a subclass), so that name-keyed knowledge (a convolutional model) still applies."""
    cls = type(module)
    if _parametrizations(module) is not None and cls.__bases__:
        return cls.__bases__[0].__name__
    return cls.__name__


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters ``module`` owns directly, with those its parametrizations hold for it (weight norm's
    ``original0``/``original1``): what the optimizer updates for this layer."""
    params = list(module.parameters(recurse=False))
    extra = _parametrizations(module)
    return params + list(extra.parameters()) if extra is not None else params


def parametrization_parts(model: nn.Module) -> set[int]:
    """``id`` of every module under a parametrized module's ``parametrizations`` (see above): not layers."""
    parts: set[int] = set()
    for module in model.modules():
        extra = _parametrizations(module)
        if extra is not None:
            parts.update(id(m) for m in extra.modules())
    return parts


def is_block(module: nn.Module) -> bool:
    """A residual block known by its class (see ``_BLOCK_NAME``) or an attention-holding ``...Layer``."""
    name = type(module).__name__
    if _NOT_BLOCK_NAME.search(name) or not _has_params_below(module):
        return False
    if _BLOCK_NAME.search(name):
        return True
    return name.endswith("Layer") and any(_ATTENTION_CHILD.search(child) for child, _ in module.named_children())


_INDEX = re.compile(r"^\d+$")


def stream_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose outputs make up the path the gradient takes through depth.

    Known residual blocks (``is_block``), outermost first when they nest. With fewer than two of them, the
    outermost modules that sit at a numeric index of a container and hold two or more parameterised modules,
    when there are two or more: a user's own blocks. Those are modules whose forward runs: a ``ModuleList``
    entry that is itself a ``ModuleList`` (stages of blocks) is looked into, not taken, since no gradient ever
    reaches a ModuleList's output. A plain MLP has none (its entries are layers), nor has a plain stack wrapped
    once. Failing both, a single known block still counts: a one-layer transformer's attention and MLP are a
    scaled branch all the same.
    """
    # a wrapper (torch.compile's OptimizedModule) and the module inside it share one clean name: the inner one
    # stands for both, as in LayerIndex, or a plain stack compiled inside a container reads as two blocks
    parts = parametrization_parts(unwrap(model))
    named = [(clean_name(n), m) for n, m in unwrap(model).named_modules()
             if type(m).__name__ not in WRAPPER_TYPES and id(m) not in parts]
    known = _stream_of([n for n, m in named if n and is_block(m)])
    if len(known) >= 2:
        return known
    containers = _outermost([n for n, m in named if n and _INDEX.match(n.rsplit(".", 1)[-1])
                             and not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and _layers_below(m) >= 2])
    return containers if len(containers) >= 2 else known


def _layers_below(module: nn.Module) -> int:
    """How many modules under ``module`` own parameters directly."""
    parts = parametrization_parts(module)
    return sum(1 for c in module.modules() if c is not module and id(c) not in parts and own_parameters(c))


def _stream_of(blocks: list[str]) -> list[str]:
    """The outermost ``blocks``, except that one holding two or more blocks is a stage, not a block: its blocks are
    the stream there (PVT-v2's ``PvtV2EncoderLayer`` is a stage of ``PvtV2BlockLayer``s). One holding a single
    block-like module keeps it as part of its branch (a mixture-of-experts layer inside a decoder layer)."""
    stream: list[str] = []
    for outer in _outermost(blocks):
        inner = [b for b in blocks if b.startswith(outer + ".")]
        stream += _stream_of(inner) if len(_outermost(inner)) >= 2 else [outer]
    return stream


def _outermost(names: list[str]) -> list[str]:
    """``names`` (in ``named_modules`` order) without those nested inside an earlier one."""
    outer: list[str] = []
    for name in names:
        if not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
    return outer


# --- attention ------------------------------------------------------------------------------------------
# The module whose forward turns queries and keys into attention weights: nn.MultiheadAttention, and the innermost
# class named for it (GPT2Attention, LlamaAttention, BertSelfAttention, T5Attention, timm's Attention, nanoGPT's
# CausalSelfAttention, a user's SelfAttn): one holding another (BertAttention, T5LayerSelfAttention) is a wrapper.
_ATTENTION_CLASS = re.compile(r"(Attention|Attn)\d*$")


def _names_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or bool(_ATTENTION_CLASS.search(type(module).__name__))


def is_attention(module: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or the innermost module whose class is named ``...Attention``/``...Attn``."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    if not _ATTENTION_CLASS.search(type(module).__name__) or is_norm(module):
        return False
    return not any(_names_attention(m) for m in module.modules() if m is not module)


# --- attention and MLP projections, embeddings ---------------------------------------------------------
# leaf attribute name -> role, as the zoos name them: Llama/Mistral/Qwen2/OPT/BART (q_proj, o_proj,
# out_proj), BERT/RoBERTa/ViT/Swin (query, key, value), DistilBERT (q_lin, out_lin), T5 (q, k, v, o),
# GPT-2 (c_attn fused qkv, c_proj), GPT-NeoX (query_key_value, dense), nn.MultiheadAttention (out_proj).
_ATTN_LEAF = {
    "q_proj": "attn_q", "query": "attn_q", "q_lin": "attn_q", "q": "attn_q", "to_q": "attn_q", "wq": "attn_q",
    "k_proj": "attn_k", "key": "attn_k", "k_lin": "attn_k", "k": "attn_k", "to_k": "attn_k", "wk": "attn_k",
    "v_proj": "attn_v", "value": "attn_v", "v_lin": "attn_v", "v": "attn_v", "to_v": "attn_v", "wv": "attn_v",
    "c_attn": "attn_qkv", "query_key_value": "attn_qkv", "qkv": "attn_qkv", "qkv_proj": "attn_qkv",
    "Wqkv": "attn_qkv", "in_proj": "attn_qkv",
    "o_proj": "attn_out", "out_proj": "attn_out", "out_lin": "attn_out", "o": "attn_out", "to_out": "attn_out",
    "wo_attn": "attn_out", "c_proj": "attn_out", "dense": "attn_out", "proj": "attn_out",
}
# MLP: GPT-2 (c_fc, c_proj), Llama (gate_proj, up_proj, down_proj), OPT/BART (fc1, fc2), BERT
# (intermediate.dense, output.dense), DistilBERT (lin1, lin2), T5 (wi, wi_0, wi_1, wo), GPT-NeoX
# (dense_h_to_4h, dense_4h_to_h), ConvNeXt (pwconv1, pwconv2), torch (linear1, linear2)
_MLP_LEAF = {
    "c_fc": "mlp_in", "gate_proj": "mlp_in", "up_proj": "mlp_in", "fc1": "mlp_in", "lin1": "mlp_in",
    "wi": "mlp_in", "wi_0": "mlp_in", "wi_1": "mlp_in", "dense_h_to_4h": "mlp_in", "pwconv1": "mlp_in",
    "linear1": "mlp_in", "fc_in": "mlp_in", "w1": "mlp_in", "w3": "mlp_in",
    "down_proj": "mlp_out", "fc2": "mlp_out", "lin2": "mlp_out", "wo": "mlp_out", "dense_4h_to_h": "mlp_out",
    "pwconv2": "mlp_out", "linear2": "mlp_out", "fc_out": "mlp_out", "w2": "mlp_out",
}
_ATTN_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_PARENT = re.compile(r"mlp|ffn|feed_forward|feedforward|intermediate|DenseReluDense", re.IGNORECASE)


def role_of(name: str, module: nn.Module) -> str:
    """The role of ``module`` (qualified ``name``) in its model; one of ``ROLES``."""
    if activation_kind(module) is not None:
        return "activation"
    if is_norm(module):
        return "norm"
    if is_attention(module):
        return "attention"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return "recurrent"
    parts = clean_name(name).split(".")
    leaf, parents = parts[-1], parts[:-1]
    if isinstance(module, nn.Embedding) or (any("embed" in p.lower() for p in parts) and own_parameters(module)):
        return "embedding"
    if is_block(module):
        return "block"
    parent = parents[-1] if parents else ""
    grand = parents[-2] if len(parents) > 1 else ""
    if leaf in ("dense", "c_proj"):
        # the same leaf name means attention output or MLP output depending on where it sits:
        # BERT attention.output.dense vs output.dense; GPT-2 attn.c_proj vs mlp.c_proj
        if _ATTN_PARENT.search(parent) or (parent == "output" and _ATTN_PARENT.search(grand)):
            return "attn_out"
        if parent == "intermediate":
            return "mlp_in"
        if parent == "output" or _MLP_PARENT.search(parent):
            return "mlp_out"
    elif leaf in _ATTN_LEAF and (_ATTN_PARENT.search(parent) or leaf not in ("q", "k", "v", "o", "proj")):
        return _ATTN_LEAF[leaf]
    elif leaf in _MLP_LEAF:
        return _MLP_LEAF[leaf]
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "other"


def roles(model: nn.Module) -> dict[str, str]:
    """Every module's role by clean name, leaving out containers that are only ``other``."""
    out = {}
    parts = parametrization_parts(unwrap(model))
    for name, module in unwrap(model).named_modules():
        if id(module) in parts:
            continue
        role = role_of(name, module)
        if role != "other":
            out[clean_name(name)] = role
    # "block" means a point on the stream: a block-like module inside another block (a mixture-of-experts layer,
    # ``MixtralSparseMoeBlock``, inside its decoder layer) is part of that block's branch, not a stream of its own
    stream = stream_blocks(model)
    for name in [n for n, r in out.items() if r == "block" and n not in stream]:
        del out[name]
    for name in stream:
        out[name] = "block"
    return out


_BLOCK_NUMBER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def block_index(name: str) -> int | None:
    """The index of the repeated block a module sits in (the last number in its name), or None.

    ``model.layers.3.self_attn.q_proj`` -> 3; ``encoder.stages.1.layers.2.conv`` -> 2; ``lm_head`` -> None.
    Combine with the name's prefix where a model has several stacks (an encoder and a decoder).
    """
    numbers = _BLOCK_NUMBER.findall(clean_name(name))
    return int(numbers[-1]) if numbers else None


def model_kind(types: dict[str, str], roles_: dict[str, str] | None = None) -> str:
    """"transformer" when attention is present, "recurrent", "convolutional" or "mlp": what prescriptions
    rank remedies for. ``types``: module name -> class name (a trace's meta has both)."""
    roles_ = roles_ or {}
    values = set(roles_.values())
    kinds = set(types.values())
    if values & {"attention", "attn_q", "attn_qkv"} or any(_ATTENTION_CHILD.search(k) for k in kinds) or any(
            k.startswith(("Transformer", "MultiheadAttention")) for k in kinds):
        return "transformer"
    if values & {"recurrent"} or kinds & {"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"}:
        return "recurrent"
    if any(k.startswith("Conv") and k[-2:] in ("1d", "2d", "3d") for k in kinds):
        return "convolutional"
    return "mlp"


# --- wrappers ---------------------------------------------------------------------------------------
# torch.compile's OptimizedModule (prefix "_orig_mod."), DistributedDataParallel and DataParallel
# ("module."), FSDP ("_fsdp_wrapped_module.")
WRAPPER_TYPES = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module", "DataParallel": "module",
                 "FullyShardedDataParallel": "_fsdp_wrapped_module"}
_WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside compile/DDP/DataParallel/FSDP wrappers (nested ones too)."""
    while type(model).__name__ in WRAPPER_TYPES:
        inner = getattr(model, WRAPPER_TYPES[type(model).__name__], None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def clean_name(name: str) -> str:
    """A qualified module name without wrapper segments: ``_orig_mod`` anywhere (a compiled submodule),
    FSDP's and activation checkpointing's wrapped-module segments. DDP's ``module.`` is taken off by
    ``unwrap`` on the root (only there: ``module`` is also an ordinary attribute name)."""
    return ".".join(p for p in name.split(".") if p and p not in _WRAPPER_SEGMENTS)
