"""Are these weights freshly initialised, or trained? ``treat`` re-draws weights only on fresh ones.

A fresh init draws each weight matrix's entries independently (uniform, normal, truncated normal) or
makes it (semi-)orthogonal. Training leaves traces that no such draw has:

- **a spike in the spectrum.** For an m x n matrix of i.i.d. entries of variance s^2 the largest singular
  value sits at the Marchenko-Pastur edge s (sqrt(m) + sqrt(n)); gradient updates are low-rank and push
  singular values out beyond it (Martin & Mahoney 2021, heavy-tailed self-regularisation).
- **heavy tails or an offset.** Uniform draws have kurtosis 1.8, normal 3; trained weights grow tails.
- **entries past a uniform draw's edge.** A uniform draw (torch's default for Linear/Conv/RNN, Xavier's
  and He's uniform variants) has no entry beyond sqrt(3) std; training smears the edges outward. Where a
  layer's weights are torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), its bias was drawn from the same
  range (or set to a constant), and a bias outside it was moved there by training.
- **normalisation layers off (1, 0).** LayerNorm/BatchNorm/GroupNorm start with weight 1 and bias 0.

``freshness(model)`` returns True (every test passed on every matrix that is big enough to test),
False (a test failed: the reason says which tensor and why), or None (nothing to test). ``treat`` reads
None as trained: re-drawing trained weights destroys them, keeping fresh ones costs nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradmedic.architecture import NORM_TYPES

__all__ = ["freshness"]

# Largest singular value over the Marchenko-Pastur edge. i.i.d. draws sit at or below 1 (finite-size
# Tracy-Widom fluctuations are a few percent at the sizes tested: 1.02 at 16x16 over 200 seeds);
# orthogonal draws at 1 / (1 + sqrt(n/m)) <= 0.5 of it. 1.3 leaves a wide margin for small matrices.
SPIKE_LIMIT = 1.3
# Excess kurtosis allowed above the normal's 3: six standard errors (sqrt(24 / N)), at least 1, so a
# truncated or a Student-like init of a small layer is not taken for training.
KURTOSIS_SLACK_SE = 6.0
# |mean| over the standard error of the mean (std / sqrt(N)): six standard errors.
MEAN_LIMIT_SE = 6.0
# A matrix smaller than this tells nothing reliable (an 8x8 matrix has 64 entries).
MIN_ENTRIES = 64
# A uniform draw has kurtosis 1.8, a normal one 3: below 2.1 (plus six standard errors of a sample kurtosis,
# sqrt(0.8 / N) for the uniform's) a matrix is read as a uniform draw and its edge is tested.
UNIFORM_KURTOSIS = 2.1
# Its largest |entry| may exceed the edge estimated from the std, sqrt(3) std, only by the estimate's own
# error, which scales as sqrt(0.8 / N): over 5000 fresh draws the largest excess was 3.8 of those units at
# N = 64 and 2.8 at N = 4096; 5 units plus 1% stays clear of every fresh draw.
EDGE_SLACK = 5.0


def _matrices(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
            yield f"{name}.weight", module.weight.detach().reshape(module.weight.shape[0], -1)
        elif isinstance(module, nn.RNNBase):
            for pname, p in module.named_parameters(recurse=False):
                if pname.startswith("weight"):
                    yield f"{name}.{pname}", p.detach()
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            for i, block in enumerate(module.in_proj_weight.detach().chunk(3)):  # q, k, v drawn as one
                yield f"{name}.in_proj_weight[{'qkv'[i]}]", block


def _verdict(name: str, w: torch.Tensor) -> str | None:
    """Why ``w`` does not look like a fresh draw, or None."""
    w = w.double()
    n = w.numel()
    if n < MIN_ENTRIES or min(w.shape) < 2:
        return None
    std = float(w.std())
    if std == 0.0:
        return None  # zeros or a constant: a deliberate init (Fixup, ReZero), nothing to read
    mean = float(w.mean())
    if abs(mean) > MEAN_LIMIT_SE * std / math.sqrt(n):
        return f"{name} has mean {mean:.3g}, {abs(mean) / (std / math.sqrt(n)):.0f} standard errors from 0"
    centred = w - mean
    kurtosis = float(centred.pow(4).mean() / centred.pow(2).mean() ** 2)
    if kurtosis > 3.0 + max(1.0, KURTOSIS_SLACK_SE * math.sqrt(24.0 / n)):
        return f"{name} has heavy tails (kurtosis {kurtosis:.2f}; fresh draws have 1.8 to 3)"
    if kurtosis < UNIFORM_KURTOSIS + KURTOSIS_SLACK_SE * math.sqrt(0.8 / n):
        edge = math.sqrt(3.0) * std * (1 + EDGE_SLACK * math.sqrt(0.8 / n) + 0.01)
        peak = float(centred.abs().max())
        if peak > edge:
            excess = peak / (math.sqrt(3.0) * std)
            return f"{name} looks like a uniform draw but has entries {excess:.2f}x past its edge"
    rms = math.sqrt(float(centred.pow(2).mean()))
    top = float(torch.linalg.matrix_norm(centred, ord=2))
    edge = rms * (math.sqrt(w.shape[0]) + math.sqrt(w.shape[1]))
    if top > SPIKE_LIMIT * edge:
        return f"{name} has a singular value {top / edge:.2f}x the random-matrix edge (a trained direction)"
    return None


def _default_bias_moved(model: nn.Module) -> str | None:
    """A bias beyond torch's default range in a layer whose weights are torch's default uniform draw."""
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or module.bias is None:
            continue
        w = module.weight.detach().double()
        n, fan_in = w.numel(), w[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        slack = EDGE_SLACK * math.sqrt(0.8 / n) + 0.01
        if n < MIN_ENTRIES or abs(float(w.std()) * math.sqrt(3.0) / bound - 1) > slack:
            continue  # not torch's default draw: nothing known about its bias
        b = module.bias.detach().double()
        if b.numel() > 1 and float(b.std()) > 0 and float(b.abs().max()) > bound * 1.0001:
            return f"'{name}' has torch's default weights but a bias outside their range (moved by training)"
    return None


def freshness(model: nn.Module) -> tuple[bool | None, str]:
    """(True, why) when the weights look freshly initialised, (False, why) when they look trained,
    (None, why) when there is nothing to tell from."""
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None:
            w, b = module.weight.detach(), module.bias
            if not bool((w == 1).all()) or (b is not None and not bool((b.detach() == 0).all())):
                return False, f"normalisation layer '{name}' has moved from its initial weight 1 and bias 0"
    moved = _default_bias_moved(model)
    if moved is not None:
        return False, moved
    tested = 0
    for name, w in _matrices(model):
        if not w.is_floating_point():
            continue
        why = _verdict(name, w)
        if why is not None:
            return False, why
        tested += w.numel() >= MIN_ENTRIES
    if not tested:
        return None, "no weight matrix large enough to tell fresh from trained"
    return True, f"{tested} weight matrices look like fresh random draws"
