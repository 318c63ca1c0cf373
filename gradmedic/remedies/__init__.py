"""Remedies: torch-shaped functions that act on a model or a training loop, and ``treat`` to choose them."""

from gradmedic.remedies.accumulate import accumulate
from gradmedic.remedies.clip import MODES, AutoClip, adaptive_clip_grad_, clip_
from gradmedic.remedies.critical import critical_, critical_scale, gradient_gain
from gradmedic.remedies.freshness import freshness
from gradmedic.remedies.gradcheck import GradcheckResult, gradcheck
from gradmedic.remedies.groups import decay_groups
from gradmedic.remedies.howto import HowTo, howto
from gradmedic.remedies.init import (
    chrono_bias_,
    fixup_,
    following_activations,
    forget_gate_bias_,
    he_,
    identity_recurrent_,
    lsuv_,
    orthogonal_,
    xavier_,
)
from gradmedic.remedies.order import remedy_order
from gradmedic.remedies.precision import ScaledStep
from gradmedic.remedies.qk_modules import QKNorm, QKNormMultiheadAttention
from gradmedic.remedies.qk_norm import qk_norm_
from gradmedic.remedies.restart import RestartOnVanishing, dormant_units, recycle_
from gradmedic.remedies.schedules import exponential_decay, linear_warmup, step_decay, warm_restarts
from gradmedic.remedies.surgery import (
    ACTIVATIONS,
    LayerScale,
    Residual,
    add_normalization,
    add_residual,
    swap_activation,
)
from gradmedic.remedies.treat import treat
from gradmedic.remedies.treatment import Treatment
from gradmedic.remedies.zloss import ZLoss, z_loss

__all__ = ["ACTIVATIONS", "MODES", "AutoClip", "GradcheckResult", "HowTo", "LayerScale", "QKNorm",
           "QKNormMultiheadAttention", "Residual", "RestartOnVanishing", "ScaledStep", "Treatment", "ZLoss",
           "accumulate", "adaptive_clip_grad_", "add_normalization", "add_residual", "chrono_bias_", "clip_",
           "critical_", "critical_scale", "decay_groups", "dormant_units", "exponential_decay", "fixup_",
           "following_activations", "forget_gate_bias_", "freshness", "gradcheck", "gradient_gain", "he_", "howto",
           "identity_recurrent_", "linear_warmup", "lsuv_", "orthogonal_", "qk_norm_", "recycle_", "remedy_order",
           "step_decay", "swap_activation", "treat", "warm_restarts", "xavier_", "z_loss"]
