"""The depth rules: vanishing and exploding gradients, read along the path the gradient takes.

Where a model has residual blocks (``gradmedic.architecture.stream_blocks``), the profile is the gradient
reaching each block's output: the residual stream, the path the gradient takes through depth. Layers
inside a block are its branch: LayerScale (1e-6 in ConvNeXt), ReZero (0), a zero-initialised last BN
gamma, small q/k projections (near-uniform attention) all scale a branch's gradient down by design, so
the branch's own layers are not compared with the deepest layers; a model with one block (a one-layer
transformer), or with blocks whose output gradient cannot be seen, has no depth profile. Without blocks (a
plain MLP or CNN) every parameterised layer is on the path and the profile reads them all, in the order
they ran.
The profile rules compare each entry with those nearest the loss, so they do not depend on the loss's
scale, the batch size or the learning rate.
"""

from __future__ import annotations

import math

import numpy as np

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import SEVERITIES, Finding
from gradmedic.diagnosis.rules._common import depth_order, finding, latest, plain_blocks, severity_of
from gradmedic.diagnosis.rules._path import floored, off_path, stream_under_head
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.diagnosis.rules.training import gradient_jump
from gradmedic.trace import Trace

__all__ = ["exploding_gradients", "vanishing_gradients", "zero_gradient"]

# a network this deep (parameterised layers) is where a skip path, not only the init, decides (He et al. 2016)
DEEP = 10

# --- depth profile ---------------------------------------------------------------------------------
# A layer whose gradient (as backward signal RMS *and* as grad/weight, the speed it learns at) is 100x
# below the last layer's: Nielsen's 4-hidden-layer sigmoid net, whose first layer learns ~100x slower
# than its last. Both measures must agree: RMS per element alone falls in healthy CNNs whose early maps
# have many more elements, and grad/weight alone misleads on zero- or tiny-weight layers.
VANISHING_WARNING = 1e-2
# 1e-5: at a learning rate that suits the last layer the first one would need 10^5 times more steps.
VANISHING_ERROR = 1e-5
# Growth toward the input through plain layers. Calibrated on the trainability grid (BENCHMARKS.md): tanh
# nets in the chaotic phase (sigma_w^2 >= 2.5) grow it 23-34x at depth 40-80 and do not train, while every
# cell that trains stays at or below 9.9x; 15 lies between (their geometric mean). 10^5 is an error.
EXPLODING_WARNING = 15.0
EXPLODING_ERROR = 1e5
# Along a residual stream the mirror image of the vanishing warning, 100x: blocks add their branches to
# the stream, so a modest growth toward the input is their normal sum, not chaos.
EXPLODING_STREAM_WARNING = 1e2
# Batch-normalised nets: BatchNorm itself makes gradients grow toward the input at init by a fixed factor
# per BN layer (Yang et al. 2019, "A Mean Field Theory of Batch Normalization"), and the weights before a
# BN are scale-invariant, so a large gradient grows them and slows itself down (Arora et al. 2019). Such
# nets train: MobileNetV2 (16 inverted-residual blocks, ~50 BNs) reads 100-200x at init. A warning from
# 1000x there.
EXPLODING_BATCHNORM_WARNING = 1e3
# A gradient many times the weight it updates. Healthy layers sit at 1e-4..1e-1; this catches nets whose
# forward signal explodes, so that their gradients are huge but flat across depth (large deltas times small
# inputs early, small deltas times large inputs late). Calibrated on the trainability grid (ReLU, sigma_w^2
# > 2, SGD lr 0.01; BENCHMARKS.md): cells that train reach up to 55, cells that do not from 79; 64 lies
# between (at 64 one SGD step at lr 1/64 replaces the layer wholesale).
GRAD_TO_WEIGHT_EXPLODING = 64.0
GRAD_TO_WEIGHT_EXPLODING_ERROR = 1e4  # no learning rate that suits any other layer can train this one
# ... against a weight no smaller than this share of the model's typical weight per element (the median over its
# layers of weight_norm / sqrt(parameters)): a layer small by design (an output head at gain 0.01, issue 28 class 4:
# per element 59x below its peers, grad/weight 72 while the net trains to R^2 1.000) is not a forward that explodes,
# which makes every layer's grad/weight huge. 0.1: a tenth of its peers is already far below any default init's
# spread of scales (PyTorch's default Linear std 1/sqrt(3 fan_in) spans 3x between fan-ins of 8 and 64), and the
# trainability grid's layers all share one scale, so the floor never applies there.
WEIGHT_FLOOR = 0.1
# The reference for a depth profile: the median over the deepest quarter of the layers, so that a small,
# special head (a 16x10 classifier after global pooling) does not set the scale for everything else.
REFERENCE_FRACTION = 0.25
# ... and at least two layers, their geometric median (the median of the logs): one small-by-design output head
# (issue 28 class 4: a regression net whose head has gain 0.01, 72x the others' grad/weight; a confident head
# scaled x50) must not alone set the scale of a 3-layer net, whose layers before it read 100x "vanishing" (or
# 22x "exploding") against it while the net trains to R^2 1.000 (benchmarks/handwritten_calibration.md).
REFERENCE_MIN_LAYERS = 2
# The residual stream's grad/weight (the median over its blocks of each one's fastest layer) against the head's (the
# layers that run after the last block, outside every block): a gradient tiny everywhere has a flat profile, which
# the profile above cannot see (issue 28 class 7). Relative to the head, not absolute, since a converged model's
# gradients are tiny everywhere (the corpus's trained graph net: 2e-6 in every layer, yet 0.36 of its head's).
# The corpus's 16-layer graph net at half its init scale reads 1.1e-6 at init and 1.2e-4 after 5 Adam steps and does
# not train (1.41 -> 0.83 where its x1 twin reaches 0.13); every healthy entry with blocks reads 0.018 (the x1 twin
# at init) to 0.58, at init and after 5 steps (tests/handwritten.py; the numbers are _path.stream_under_head's). 1e-3
# lies between (near their geometric mean, 1.5e-3): an error, since at the head's learning rate the stream needs
# 1000x the steps.
STREAM_UNDER_HEAD_ERROR = 1e-3
# Over a run: the total gradient norm growing 1000x from its first measurement.
RUN_GROWTH_WARNING = 1e3
RUN_GROWTH_ERROR = 1e6
# Through a residual stream only the backward signal is read (grad/weight of a block mixes every branch,
# each scaled by design); the thresholds are the same factors of the deepest blocks' signal.



def _profile(trace: Trace) -> tuple[int, list[str], np.ndarray, np.ndarray, str, np.ndarray] | None:
    """(step, layers or blocks in depth order, signal and grad/weight relative to the deepest, "blocks"
    or "layers", and which of them make the reference: the deepest quarter of each stack).

    The backward signal here is the norm of dL/d(output) over the whole tensor: its RMS per element
    falls with the number of elements, so early conv maps with many positions would look vanished.
    """
    signal = latest(trace, "backward_norm")
    ratio = latest(trace, "grad_to_weight")
    if signal is None or ratio is None:
        return None
    step, bs = signal
    roles = trace.meta.get("roles", {})
    blocks = depth_order(trace, step, [k for k, r in roles.items() if r == "block" and k in bs
                                       and math.isfinite(bs[k])])
    if len(blocks) < 2 and any(r == "block" for r in roles.values()):
        # one block (a one-layer transformer), or blocks whose output gradient was not seen (Reformer's reversible
        # layers run inside a custom Function, without a graph of their own): a stream of one point or none has no
        # profile, and the layers inside the blocks are their branches, scaled by design (small q/k gradients at
        # init), not points on the path the gradient takes
        return None
    if len(blocks) >= 2:
        # one profile per stack (an encoder's and a decoder's blocks): the encoder's gradient arrives through
        # cross-attention, so it is compared with the encoder's own deepest blocks, not with the decoder's
        # grad/weight of a block: of all its parameters together, the speed the block learns at; a scaled
        # branch keeps it small by design, so like a layer's it counts only together with the stream's
        grads, weights = latest(trace, "grad_norm"), latest(trace, "weight_norm")
        gsq, wsq = _block_sums(blocks, grads[1] if grads else {}), _block_sums(blocks, weights[1] if weights else {})
        b = np.array([bs[k] for k in blocks])
        g = np.array([math.sqrt(gsq[k] / wsq[k]) if wsq.get(k) else math.nan for k in blocks])
        stacks = [_stack(k) for k in blocks]
        reference_blocks = np.zeros(len(blocks), dtype=bool)
        for stack in dict.fromkeys(stacks):
            mine = np.array([s == stack for s in stacks])
            deep = max(1, math.ceil(REFERENCE_FRACTION * int(mine.sum())))
            reference_blocks[np.flatnonzero(mine)[-deep:]] = True
            reference = np.median(b[mine][-deep:])
            if reference <= 0:
                return None  # no gradient at all: zero_gradient's case
            b[mine] = b[mine] / reference
            g_ref = np.nanmedian(g[mine][-deep:]) if np.any(np.isfinite(g[mine][-deep:])) else math.nan
            g[mine] = g[mine] / g_ref if g_ref > 0 else b[mine]
        g = np.where(np.isfinite(g), g, b)
        return step, blocks, b, g, "blocks", reference_blocks
    off = off_path(trace)
    gw = {k: v for k, v in ratio[1].items() if v > 0 and math.isfinite(v) and k not in off}
    layers = depth_order(trace, step, [k for k in bs if k in gw and bs[k] > 0])
    if len(layers) < 2:
        return None
    b = np.array([bs[k] for k in layers])
    g = np.array([gw[k] for k in layers])
    deep = min(len(layers), max(REFERENCE_MIN_LAYERS, math.ceil(REFERENCE_FRACTION * len(layers))))
    b, g = b / _geometric_median(b[-deep:]), g / _geometric_median(g[-deep:])
    # an embedding's grad/weight is small by design (only the rows a batch uses get a gradient, and its
    # init is N(0, 1)): its signal alone says whether gradient reaches it
    embedding = np.array([roles.get(k) == "embedding" for k in layers])
    return step, layers, b, np.where(embedding, b, g), "layers", np.arange(len(layers)) >= len(layers) - deep


def _geometric_median(values: np.ndarray) -> float:
    """The median of the logs: the median itself for an odd count, the geometric mean of the two middle values for
    an even one (their arithmetic mean would let the larger of two decide)."""
    return float(np.exp(np.median(np.log(values))))


def _block_sums(blocks: list[str], per_layer: dict[str, float]) -> dict[str, float]:
    """Sum of squares of a per-layer norm over each block's layers (and its own parameters)."""
    out = {}
    for block in blocks:
        values = [v for k, v in per_layer.items() if (k == block or k.startswith(block + ".")) and math.isfinite(v)]
        if values:
            out[block] = float(sum(v * v for v in values))
    return out


def _stack(block: str) -> str:
    """The stack a block belongs to: its name up to its first index (``model.encoder.layers``); nested
    indices (``stages.1.layers.0``) stay in one stack."""
    parts = block.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    return ".".join(parts[:first])


def zero_gradient(trace: Trace, ctx: Context) -> list[Finding]:
    """Every measured layer's gradient is exactly zero: nothing can learn. In 16 bits (a half model or
    autocast) that is underflow (a tiny loss); in float32 a loss that does not depend on the outputs."""
    measured = latest(trace, "grad_norm")
    if measured is None or not measured[1] or any(v != 0 for v in measured[1].values()):
        return []
    step, norms = measured
    layers = depth_order(trace, step, list(norms))
    evidence = {"step": step, "layers": len(layers), "zero_everywhere": True}
    if ctx.low_precision:
        how = "under autocast" if ctx.autocast else "in 16 bits"
        return [finding("gradient_underflow", "error", layers,
                        f"Every gradient is exactly zero {how}: the backward underflowed to zero before it reached "
                        f"any parameter ({len(layers)} layers); scale the loss up.", evidence, ctx)]
    return [finding("vanishing_gradients", "error", layers,
                    f"Every gradient is exactly zero ({len(layers)} layers): the loss does not change with any "
                    "parameter (a loss multiplied by 0, detached outputs, or a constant).", evidence, ctx)]


def vanishing_gradients(trace: Trace, ctx: Context) -> list[Finding]:
    zero = zero_gradient(trace, ctx)
    if zero:
        return [f for f in zero if f.kind == "vanishing_gradients"]
    profile = _profile(trace)
    if profile is None:
        return []
    step, layers, b, g, unit, _ = profile
    # a layer vanishes when the geometric mean of its signal and its speed has fallen: neither alone (see
    # above), and not only when both have (the max): a plain ReLU net in the ordered phase (sigma_w^2 < 2)
    # loses its backward signal 1000x while grad/weight falls 100x, because its activations shrink too; the
    # trainability grid (BENCHMARKS.md) separates trainable from untrainable cells by 20x on this measure
    both = np.sqrt(b * g)
    hit = [k for k, v in zip(layers, both, strict=True) if v < VANISHING_WARNING]
    under_head = stream_under_head(trace, layers, WEIGHT_FLOOR) if unit == "blocks" else None
    if under_head is not None and under_head >= STREAM_UNDER_HEAD_ERROR:
        under_head = None
    flat = not hit and under_head is not None
    if flat:
        # the whole stream learns far slower than its head: every block hardly learns, though the profile is flat
        hit = list(layers)
    if not hit:
        return []
    worst = float(both.min())
    severity = "error" if under_head is not None else severity_of(worst, VANISHING_WARNING, VANISHING_ERROR)
    assert severity is not None
    # the layer the gradient falls most into on its way back from the loss: gains[i] is how much larger layer i+1's
    # is than layer i's (the profile runs input first), so the steepest fall backward lands at i = argmax
    gains = np.diff(np.log10(np.maximum(both, 1e-300)))
    drop_at = layers[int(np.argmax(gains))] if len(gains) else layers[0]
    # the activation modules by name; functional ones (torch.tanh in a forward) are not modules, and go unnamed
    acts = ", ".join(ctx.activations)
    acts = f" of {acts} activations" if acts else ""
    if unit == "blocks":
        stream = "at the output of block" if plain_blocks(trace) else "on the residual stream at the output of"
        message = (f"The gradient {stream} '{hit[0]}' is "
                   f"{b[layers.index(hit[0])]:.1e} of that at the deepest blocks and the block learns "
                   f"{g[layers.index(hit[0])]:.1e} as fast: it vanishes through {len(layers) - 1} blocks; "
                   f"{len(hit)} block(s) hardly learn.")
    else:
        message = (f"The gradient reaching '{hit[0]}' is {b[layers.index(hit[0])]:.1e} of that at the deepest "
                   f"layers and it learns {g[layers.index(hit[0])]:.1e} as fast: it vanishes through "
                   f"{len(layers) - 1} layers{acts}; {len(hit)} layer(s) hardly learn.{_sigmoid_slope(trace, ctx)}")
    evidence = {"step": step, "signal_ratio": float(b[0]), "grad_weight_ratio": float(g[0]), "worst_ratio": worst,
                "steepest_drop_into": drop_at, "depth": len(layers), "profile": unit}
    if under_head is not None:
        evidence["stream_over_head_grad_weight"] = under_head
        tiny = (f"the blocks learn {under_head:.1e} as fast as the head after them: the gradient is tiny all along "
                "the stream")
        message = (f"From '{hit[0]}' on, {tiny}, though it is flat through the {len(layers)} blocks; they hardly learn."
                   if flat else f"{message} And {tiny}.")
    return [finding("vanishing_gradients", severity, hit, message, evidence, ctx)]


SIGMOID_MAX_SLOPE = 0.25  # sigma'(x) = sigma(x)(1 - sigma(x)) <= 1/4, at x = 0
UNSATURATED = 0.1  # saturated fraction below the saturated_units rule's info level (rules.units.SATURATED_INFO)


def _sigmoid_slope(trace: Trace, ctx: Context) -> str:
    """Why a sigmoid net vanishes when none of its units saturate: a reader who sees no saturation finding
    otherwise looks for another cause."""
    if "Sigmoid" not in ctx.activations or "saturated_frac" not in trace.metrics:
        return ""
    saturated = [v for v in trace.last("saturated_frac").values() if math.isfinite(v)]
    if saturated and max(saturated) >= UNSATURATED:
        return ""
    return (f" Sigmoid's slope is at most {SIGMOID_MAX_SLOPE} even where its units are not saturated, so each "
            "layer passes back at most a quarter of the gradient.")


def exploding_gradients(trace: Trace, ctx: Context) -> list[Finding]:
    found = []
    profile = _profile(trace)
    if profile is not None:
        step, layers, b, g, unit, reference = profile
        stream = unit == "blocks" and not plain_blocks(trace)
        both = np.minimum(b, g)
        warning = EXPLODING_BATCHNORM_WARNING if ctx.batchnorm else (
            EXPLODING_STREAM_WARNING if stream else EXPLODING_WARNING)
        # growing toward the input: a layer among the deepest, which set the scale, is above it only where the
        # gradient falls steeply toward the input within them (a vanishing net's last layer read "exploding")
        hit = [k for k, v, deep in zip(layers, both, reference, strict=True) if v > warning and not deep]
        if hit:
            worst = float(both[~reference].max())
            severity = severity_of(worst, warning, EXPLODING_ERROR, below=False)
            assert severity is not None
            where = ("on the residual stream from the deepest blocks" if stream else
                     f"from the deepest {'blocks' if unit == 'blocks' else 'layers'}")
            message = f"The gradient grows {worst:.1e}x {where} back to '{hit[0]}': it explodes through depth."
            found.append(finding("exploding_gradients", severity, hit, message,
                                  {"step": step, "signal_ratio": float(b[0]), "grad_weight_ratio": float(g[0]),
                                   "worst_ratio": worst}, ctx))
    measured = latest(trace, "grad_to_weight")
    if measured is not None and not ctx.normalized:
        # the absolute rule catches a forward signal that explodes; normalisation layers rescale the
        # forward at every block, so with them it reads only small-by-design weights (0.02-std transformer
        # init, LayerScale gammas) and is not applied
        step, gw = measured
        roles = trace.meta.get("roles", {})
        off = off_path(trace)
        gw = {k: v for k, v in floored(trace, gw, WEIGHT_FLOOR).items()
              if roles.get(k) not in ("block", "norm") and k not in off}
        hot = [k for k in depth_order(trace, step, list(gw)) if gw[k] > GRAD_TO_WEIGHT_EXPLODING]
        if hot:
            top = max(gw[k] for k in hot)
            severity = severity_of(top, GRAD_TO_WEIGHT_EXPLODING, GRAD_TO_WEIGHT_EXPLODING_ERROR, below=False)
            assert severity is not None
            said = (f"Gradients are up to {top:.1e}x the weights they update (at '{hot[0]}' and {len(hot) - 1} more): "
                    "one step at an ordinary learning rate overwrites them.")
            if found:
                # one finding of the two readings, as severe as the worse: a profile that grows little (the ratio is
                # huge but flat through depth, min(signal, grad/weight) ~35x) must not hide grad/weight at 1e7
                profile_finding = found.pop()
                worse = max(profile_finding.severity, severity, key=SEVERITIES.index)
                layers = profile_finding.layers + [k for k in hot if k not in profile_finding.layers]
                found.append(finding("exploding_gradients", worse, layers, f"{profile_finding.message} {said}",
                                     {**profile_finding.evidence, "max_grad_to_weight": top}, ctx))
            else:
                found.append(finding("exploding_gradients", severity, hot, said, {"step": step,
                                                                                    "max_grad_to_weight": top}, ctx))
    if "total_grad_norm" in trace.metrics and "" in trace.layers:
        total = trace.metric("total_grad_norm")[:, trace.layers.index("")]
        measured = np.flatnonzero(np.isfinite(total) & (total > 0))
        if measured.size >= 3:
            first, last = total[measured[0]], np.median(total[measured[-3:]])
            growth = float(last / first)
            severity = severity_of(growth, RUN_GROWTH_WARNING, RUN_GROWTH_ERROR, below=False)
            if severity is not None:
                found.append(finding("exploding_gradients", severity, [],
                                      f"The total gradient norm grew {growth:.1e}x during training (from "
                                      f"{first:.1e} at step {int(trace.steps[measured[0]])}).",
                                      {"growth": growth, "first": float(first), "last": float(last)}, ctx))
    # a jump that may have fallen back since: the training rules read the norm's history (training.gradient_jump)
    return found + gradient_jump(trace, ctx)


# --- remedies, ranked --------------------------------------------------------------------------------
# For saturating activations normalisation and a non-saturating activation beat re-initialising; for a deep plain
# ReLU net the right init comes first and a skip path next (the lab's depth experiments; CATALOG.md). On a
# transformer the known fixes of depth come first: a post-LN stack is fixed first by moving to pre-LN (Xiong et al.
# 2020), then by warmup, which post-LN cannot do without (Liu et al. 2020), then by DeepNorm's residual scaling (Wang
# et al. 2022); a pre-LN stack by warmup and LayerScale (Touvron et al. 2021); exploding attention by warmup,
# clipping and QK-norm (Dehghani et al. 2023).
def rank_vanishing(ctx: Context) -> list[str]:
    if ctx.saturating:
        ids = ["add_normalization", "swap_activation", "xavier_init", "add_residual", "adaptive_optimizer"]
    else:
        ids = ["he_init", "add_normalization", "add_residual", "lsuv_init", "adaptive_optimizer"]
    if ctx.depth >= DEEP and not ctx.saturating:
        ids.remove("add_residual")
        ids.insert(1, "add_residual")
    if ctx.normalized:
        ids.remove("add_normalization")
        ids.append("add_normalization")
    return ids


def rank_exploding(ctx: Context) -> list[str]:
    return ["clip_grad_norm", "he_init" if ctx.relu else "xavier_init", "add_normalization", "lower_learning_rate",
            "agc", "autoclip"]


register(Rule("vanishing_gradients", vanishing_gradients, rank_vanishing, {
    "post": ("pre_ln", "lr_warmup", "deepnorm", "layerscale"),
    "pre": ("lr_warmup", "layerscale", "deepnorm"),
    None: ("pre_ln", "lr_warmup", "deepnorm", "layerscale")}))
register(Rule("exploding_gradients", exploding_gradients, rank_exploding, {
    "post": ("lr_warmup", "pre_ln", "clip_grad_norm", "deepnorm", "qk_norm"),
    None: ("lr_warmup", "clip_grad_norm", "qk_norm", "layerscale")}))
