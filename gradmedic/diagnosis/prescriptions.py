"""REMEDIES (ids with one-line descriptions) and ``prescribe``: a finding's kind + the model -> ranked ids.

The ranking follows what the field's experiments show first-hand (../shared/CATALOG.md and the lab):
for saturating activations, normalisation and a non-saturating activation beat re-initialising; for a
deep plain ReLU net, the right init comes first and a skip path next; for a tanh RNN, gates beat init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["REMEDIES", "Remedy", "prescribe"]


@dataclass(frozen=True)
class Remedy:
    id: str
    description: str
    acts_on: str  # "model" (treat changes a copy of the model) or "training" (a recipe for the loop)
    reference: str = ""


_ALL = (
    Remedy("add_normalization", "insert BatchNorm/LayerNorm after each Linear/Conv layer", "model",
           "Ioffe & Szegedy 2015; Ba et al. 2016"),
    Remedy("swap_activation", "replace sigmoid/tanh (or dying ReLU) with a non-saturating activation such as "
           "ReLU, LeakyReLU or GELU", "model", "Glorot & Bengio 2010"),
    Remedy("add_residual", "wrap same-shape blocks in residual connections, with a ReZero scale (alpha = 0 at "
           "init)", "model", "He et al. 2016; Bachlechner et al. 2020"),
    Remedy("he_init", "re-initialise weights with He/Kaiming init for the activation that follows each layer",
           "model", "He et al. 2015"),
    Remedy("xavier_init", "re-initialise weights with Xavier/Glorot init (sigmoid/tanh/linear layers)", "model",
           "Glorot & Bengio 2010"),
    Remedy("orthogonal_init", "re-initialise weights (and recurrent weights) orthogonally", "model",
           "Saxe et al. 2014"),
    Remedy("lsuv_init", "layer-sequential unit-variance init: orthonormal, then rescale each layer to unit output "
           "variance on a batch", "model", "Mishkin & Matas 2016"),
    Remedy("identity_recurrent_init", "ReLU RNN with identity recurrent weights and zero bias (IRNN)", "model",
           "Le et al. 2015"),
    Remedy("forget_gate_bias", "set LSTM forget-gate biases to 1 so memory is kept by default", "model",
           "Gers et al. 2000; Jozefowicz et al. 2015"),
    Remedy("fixup_init", "zero-initialise the last layer of each residual branch (Fixup)", "model",
           "Zhang et al. 2019"),
    Remedy("gated_recurrence", "replace the plain tanh RNN with an LSTM or GRU", "model",
           "Hochreiter & Schmidhuber 1997; Cho et al. 2014"),
    Remedy("recycle_dormant", "re-initialise dormant (dead or saturated) units: incoming weights re-drawn, "
           "outgoing zeroed (ReDo)", "model", "Sokar et al. 2023"),
    Remedy("clip_grad_norm", "clip the global gradient norm before each optimizer step", "training",
           "Pascanu et al. 2013"),
    Remedy("clip_grad_value", "clip each gradient entry to [-c, c]", "training", ""),
    Remedy("autoclip", "clip to the 10th percentile of the gradient-norm history (AutoClip)", "training",
           "Seetharaman et al. 2020"),
    Remedy("agc", "adaptive, unit-wise gradient clipping relative to the weight norm (AGC)", "training",
           "Brock et al. 2021"),
    Remedy("lower_learning_rate", "lower the learning rate (or warm it up)", "training", ""),
    Remedy("raise_learning_rate", "raise the learning rate: updates are far below 1e-3 of the weights",
           "training", ""),
    Remedy("adaptive_optimizer", "use Adam or RMSprop: per-parameter step sizes make up for small gradients",
           "training", "Kingma & Ba 2015"),
    Remedy("lr_warm_restarts", "cosine learning rate with warm restarts (SGDR)", "training",
           "Loshchilov & Hutter 2017"),
    Remedy("loss_scaling", "scale the loss before backward (torch.amp.GradScaler) so float16 gradients do not "
           "flush to zero", "training", "Micikevicius et al. 2018"),
    Remedy("higher_precision", "keep weights and gradients in float32 (or use bfloat16 autocast)", "training", ""),
    Remedy("numerical_guard", "guard the operation that makes the NaN/Inf (clamp before log/sqrt, add eps to "
           "divisors, use log-softmax)", "model", ""),
    Remedy("gradcheck", "check the module's backward against finite differences (float64)", "model", ""),
    # transformers: the known fixes for depth in attention models
    Remedy("pre_ln", "move each block's LayerNorm to the start of its residual branch (pre-LN): the stream "
           "becomes an identity path and gradients at init are well-scaled without warmup", "model",
           "Xiong et al. 2020"),
    Remedy("lr_warmup", "warm the learning rate up linearly over the first steps (a few percent of training), "
           "so Adam's early, badly estimated steps do not wreck a post-LN stack", "training",
           "Vaswani et al. 2017; Liu et al. 2020"),
    Remedy("deepnorm", "scale the residual stream up (x * alpha + F(x)) and the branch's init down "
           "(DeepNorm), so deep post-LN stacks train stably", "model", "Wang et al. 2022"),
    Remedy("layerscale", "multiply each residual branch by a learnable per-channel scale initialised small "
           "(LayerScale, 1e-5..1e-1 by depth)", "model", "Touvron et al. 2021"),
    Remedy("qk_norm", "normalise queries and keys (LayerNorm/RMSNorm before the dot product) so attention "
           "logits cannot grow without bound", "model", "Dehghani et al. 2023; Henry et al. 2020"),
    Remedy("accumulate", "accumulate gradients over micro-batches (a larger effective batch; does not fix "
           "vanishing)", "training", ""),
)

REMEDIES: dict[str, Remedy] = {r.id: r for r in _ALL}


def prescribe(kind: str, context: dict[str, Any]) -> list[str]:
    """Ranked remedy ids for one kind of finding, given what the model is made of.

    ``context`` keys read: ``saturating`` (sigmoid/tanh-like activations present), ``relu`` (ReLU family),
    ``normalized`` (BatchNorm/LayerNorm/GroupNorm present), ``residual`` (user blocks with skips are not
    detectable in general, so only known torch residual users count), ``rnn`` / ``lstm`` / ``gru``, ``depth``
    (number of parameterised layers on the main path), ``low_precision``, ``model_kind``
    (``architecture.model_kind``: "transformer", "recurrent", "convolutional", "mlp") and ``norm_placement``
    ("pre" or "post": where a block's first norm runs, read from the forward order).

    For transformers the known fixes of depth come first (CATALOG.md; the papers are in REMEDIES): a post-LN
    stack is fixed first by moving to pre-LN (Xiong et al. 2020), then by warmup, which post-LN cannot do
    without (Liu et al. 2020), then by DeepNorm's residual scaling (Wang et al. 2022); a pre-LN stack by
    warmup and LayerScale (Touvron et al. 2021); exploding attention by warmup, clipping and QK-norm
    (Dehghani et al. 2023).
    """
    sat, relu, norm = context.get("saturating"), context.get("relu"), context.get("normalized")
    deep = context.get("depth", 0) >= 10
    ids: list[str]
    if kind == "vanishing_gradients":
        if sat:
            ids = ["add_normalization", "swap_activation", "xavier_init", "add_residual", "adaptive_optimizer"]
        else:
            ids = ["he_init", "add_normalization", "add_residual", "lsuv_init", "adaptive_optimizer"]
        if deep and not sat:
            ids.remove("add_residual")
            ids.insert(1, "add_residual")
        if norm:
            ids.remove("add_normalization")
            ids.append("add_normalization")
    elif kind == "exploding_gradients":
        ids = ["clip_grad_norm", "he_init" if relu else "xavier_init", "add_normalization", "lower_learning_rate",
               "agc", "autoclip"]
    elif kind == "saturated_units":
        ids = ["swap_activation", "add_normalization", "xavier_init", "lsuv_init", "recycle_dormant"]
    elif kind == "dead_units":
        ids = ["recycle_dormant", "he_init", "swap_activation", "add_normalization", "lower_learning_rate"]
    elif kind == "nonfinite":
        ids = ["numerical_guard", "gradcheck", "lower_learning_rate", "clip_grad_norm"]
        if context.get("low_precision"):
            ids.insert(1, "loss_scaling")
    elif kind == "vanishing_through_time":
        if context.get("lstm"):
            ids = ["forget_gate_bias", "orthogonal_init", "clip_grad_norm"]
        elif context.get("gru"):
            ids = ["orthogonal_init", "clip_grad_norm"]
        else:
            ids = ["gated_recurrence", "identity_recurrent_init", "orthogonal_init"]
    elif kind == "exploding_through_time":
        ids = ["clip_grad_norm", "orthogonal_init", "gated_recurrence" if context.get("rnn") else "lower_learning_rate"]
    elif kind == "gradient_underflow":
        ids = ["loss_scaling", "higher_precision"]
    elif kind == "stalled_updates":
        ids = ["adaptive_optimizer", "raise_learning_rate", "lr_warm_restarts", "add_normalization"]
    elif kind == "no_gradient":
        ids = []  # a graph cut or an unused module: the message says what to look for; no remedy applies
    else:
        raise ValueError(f"Argument kind should be one of the finding kinds, but given {kind!r}.")
    if context.get("model_kind") == "transformer":
        ids = _TRANSFORMER_FIRST.get((kind, context.get("norm_placement")), _TRANSFORMER_FIRST.get((kind, None), [])) \
            + [i for i in ids if i not in _TRANSFORMER_HAS]
    return list(dict.fromkeys(ids))


# a transformer has residual blocks and norms already: adding them is no remedy
_TRANSFORMER_HAS = ("add_residual", "add_normalization")

# (kind, norm placement) -> the transformer remedies ranked before the general ones
_TRANSFORMER_FIRST: dict[tuple[str, str | None], list[str]] = {
    ("vanishing_gradients", "post"): ["pre_ln", "lr_warmup", "deepnorm", "layerscale"],
    ("vanishing_gradients", "pre"): ["lr_warmup", "layerscale", "deepnorm"],
    ("vanishing_gradients", None): ["pre_ln", "lr_warmup", "deepnorm", "layerscale"],
    ("exploding_gradients", "post"): ["lr_warmup", "pre_ln", "clip_grad_norm", "deepnorm", "qk_norm"],
    ("exploding_gradients", None): ["lr_warmup", "clip_grad_norm", "qk_norm", "layerscale"],
    ("nonfinite", None): ["numerical_guard", "lr_warmup", "qk_norm"],
    ("stalled_updates", None): ["lr_warmup"],
}
