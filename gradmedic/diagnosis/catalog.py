"""REMEDIES: the one catalog of remedies. Each is said once: its id, a one-line description, the paper, and
whether it acts on the model (``treat`` changes a copy) or on the training recipe. The rules rank these ids
(``gradmedic.diagnosis.rules``); ``treat``'s actions register under them (``gradmedic.remedies.actions``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REMEDIES", "Remedy"]


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
           "so Adam's early, badly estimated steps do not wreck the model (a post-LN stack the most)", "training",
           "Vaswani et al. 2017; Liu et al. 2020"),
    Remedy("deepnorm", "scale the residual stream up (x * alpha + F(x)) and the branch's init down "
           "(DeepNorm), so deep post-LN stacks train stably", "model", "Wang et al. 2022"),
    Remedy("layerscale", "multiply each residual branch by a learnable per-channel scale initialised small "
           "(LayerScale, 1e-5..1e-1 by depth)", "model", "Touvron et al. 2021"),
    Remedy("qk_norm", "normalise queries and keys (LayerNorm/RMSNorm before the dot product) so attention "
           "logits cannot grow without bound", "model", "Dehghani et al. 2023; Henry et al. 2020"),
    # training-run failures (issue 26): the fixes the instability literature ranks
    Remedy("z_loss", "add z-loss 1e-4 * logsumexp(logits)**2 to the loss, which pins the output softmax's log "
           "partition near 0 so the output logits cannot drift", "training",
           "Chowdhery et al. 2022 (PaLM); Wortsman et al. 2023"),
    Remedy("lower_adam_epsilon", "lower Adam's eps (1e-8 -> 1e-15) so that layers whose gradient RMS is near eps "
           "keep Adam's normalised step instead of SGD's tiny one", "training", "Wortsman et al. 2023"),
    Remedy("lower_beta2", "lower Adam's beta2 (0.999 -> 0.95): v tracks a gradient that grows suddenly, so a "
           "rare large gradient cannot make one huge step", "training",
           "Zhai et al. 2023; Wortsman et al. 2023; Molybog et al. 2023"),
    Remedy("weight_decay_exclusions", "use decoupled weight decay (AdamW) on the weight matrices and the output "
           "head, not on biases, norms and embeddings", "training", "Loshchilov & Hutter 2019; Wortsman et al. 2023"),
    Remedy("skip_and_rewind", "rewind to a checkpoint some 100 steps before the spike and skip the batches around "
           "it", "training", "Chowdhery et al. 2022 (PaLM)"),
    Remedy("loss_scale_floor", "find the layer whose float16 output overflows (gm.check, the NaN/Inf probe) and keep "
           "it in float32, or train in bfloat16, instead of letting GradScaler halve its scale to nothing",
           "training", "Micikevicius et al. 2018"),
    Remedy("accumulate", "accumulate gradients over micro-batches (a larger effective batch; does not fix "
           "vanishing)", "training", ""),
)

REMEDIES: dict[str, Remedy] = {r.id: r for r in _ALL}
