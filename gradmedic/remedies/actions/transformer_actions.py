"""Transformer actions on ``torch.nn`` Transformer layers: pre-LN, LayerScale, DeepNorm; and QK-norm on any attention.

- ``pre_ln`` (Xiong et al. 2020): ``norm_first=True`` in every post-LN ``TransformerEncoderLayer`` /
  ``TransformerDecoderLayer``, and a final LayerNorm on their stack where it has none (a pre-LN stack's
  output is not normalised otherwise). It changes the function: fresh weights only.
- ``layerscale`` (Touvron et al. 2021): a per-channel scale at the end of each residual branch (after the
  branch's dropout). On fresh weights it starts small (CaiT's 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6
  beyond), so each block starts near the identity; on trained weights it starts at 1, the identity, and
  the model computes exactly what it did.
  Scaled layers leave torch's fused inference path (which would bypass the scale) for the module one.
- ``deepnorm`` (Wang et al. 2022): for post-LN stacks of N layers, ``LN(alpha x + f(x))`` with
  ``alpha = (2N)^(1/4)`` (encoder; ``(3N)^(1/4)`` decoder), written as the branch scaled by ``1/alpha``
  (the same up to LayerNorm's eps), and the value, output and feed-forward projections scaled by
  ``beta = (8N)^(-1/4)`` (``(12N)^(-1/4)``). Rescales fresh weights: fresh only.
- ``qk_norm`` (Dehghani et al. 2023; ``gradmedic.remedies.qk_norm_``): a norm of each head's queries and keys in
  every attention module it can read (torch.nn and the common Hugging Face classes). It changes what the model
  computes (a per-token normalisation cannot be undone by a gain): fresh weights, with gains at 1, the papers' init;
  on trained weights (where treat would not apply it) the gains would start at the batch's measured scale.
"""

from __future__ import annotations

import torch
from torch import nn

from gradmedic._errors import GradmedicError
from gradmedic.remedies.actions._registry import Patient, action
from gradmedic.remedies.qk_norm import qk_norm_
from gradmedic.remedies.surgery import LayerScale

_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# branch-ending dropouts: encoder (self-attention, feed-forward); decoder (self-, cross-attention, feed-forward)
_BRANCH_ENDS = {nn.TransformerEncoderLayer: ("dropout1", "dropout2"),
                nn.TransformerDecoderLayer: ("dropout1", "dropout2", "dropout3")}


def _layers(model: nn.Module, post_ln_only: bool = False) -> list[nn.Module]:
    found = [m for m in model.modules() if isinstance(m, _LAYERS) and not (post_ln_only and m.norm_first)]
    if not found:
        raise GradmedicError("no torch.nn TransformerEncoderLayer/TransformerDecoderLayer" +
                             (" in post-LN form" if post_ln_only else "") +
                             " (other transformer code: apply the change in its own definition)")
    return found


def _width(layer: nn.Module) -> int:
    return layer.linear2.out_features


def _scale_branches(layer: nn.Module, init: float, learnable: bool = True) -> int:
    # torch's fused inference path (eval mode, no grad) computes the layer in one kernel and would skip the
    # scale: a layer whose activation is not flagged relu/gelu never takes it (the flag only picks the path)
    layer.activation_relu_or_gelu = 0
    count = 0
    for name in _BRANCH_ENDS[type(layer)]:
        end = getattr(layer, name)
        if isinstance(end, nn.Sequential) and any(isinstance(m, LayerScale) for m in end):
            continue  # scaled already
        weight = layer.linear2.weight
        scale = LayerScale(_width(layer), init, learnable).to(weight.device, weight.dtype)
        setattr(layer, name, nn.Sequential(end, scale))
        count += 1
    return count


@action("pre_ln", "insert")
def pre_ln(patient: Patient) -> str:
    layers = _layers(patient.model, post_ln_only=True)
    for layer in layers:
        layer.norm_first = True
    finals = 0
    for stack in patient.model.modules():
        if isinstance(stack, (nn.TransformerEncoder, nn.TransformerDecoder)) and stack.norm is None and \
                any(layer in layers for layer in stack.layers):
            first = stack.layers[0]
            weight = first.linear2.weight
            stack.norm = nn.LayerNorm(_width(first), eps=first.norm1.eps).to(weight.device, weight.dtype)
            if hasattr(stack, "use_nested_tensor"):
                stack.use_nested_tensor = False  # its fast path was chosen for the post-LN layers
            finals += 1
    return f"norm_first=True in {len(layers)} Transformer layer(s) (pre-LN), {finals} final LayerNorm(s) added"


def _cait_init(depth: int) -> float:
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


@action("layerscale", "scale", keeps_function=True)
def layerscale(patient: Patient) -> str:
    layers = _layers(patient.model)
    init = 1.0 if patient.trained else _cait_init(len(layers))
    count = sum(_scale_branches(layer, init) for layer in layers)
    if not count:
        raise GradmedicError("every residual branch has a LayerScale already")
    how = "at 1: the identity, the output is unchanged" if init == 1.0 else f"at {init:g}"
    return f"LayerScale on {count} residual branches of {len(layers)} Transformer layer(s), {how}"


@action("deepnorm", "init")
def deepnorm(patient: Patient) -> str:
    layers = _layers(patient.model, post_ln_only=True)
    n = len(layers)
    decoder = all(isinstance(m, nn.TransformerDecoderLayer) for m in layers)
    alpha = (3 * n if decoder else 2 * n) ** 0.25
    beta = (12 * n if decoder else 8 * n) ** -0.25
    for layer in layers:
        _scale_branches(layer, 1.0 / alpha, learnable=False)
        attn = layer.self_attn
        with torch.no_grad():
            if attn.in_proj_weight is not None:
                attn.in_proj_weight[2 * attn.embed_dim:].mul_(beta)  # the value projection
            else:
                attn.v_proj_weight.mul_(beta)
            attn.out_proj.weight.mul_(beta)
            layer.linear1.weight.mul_(beta)
            layer.linear2.weight.mul_(beta)
    return (f"DeepNorm on {n} post-LN layer(s): residual weighted by alpha = {alpha:.2f} (branch scaled by 1/alpha), "
            f"value/output/feed-forward weights scaled by beta = {beta:.3f}")



@action("qk_norm", "insert")
def qk_norm(patient: Patient) -> str:
    measured = patient.trained and patient.inputs is not None
    done = qk_norm_(patient.model, patient.inputs if measured else None)
    if not done:
        raise GradmedicError("every attention module has QK-norm already")
    if patient.treatment is not None:
        patient.treatment.note("qk_norm", inputs=measured)
    gains = "gains at the batch's measured scale" if measured else "gains at 1"
    return f"QK-norm (RMSNorm per head, {gains}) in {len(done)} attention module(s)"
