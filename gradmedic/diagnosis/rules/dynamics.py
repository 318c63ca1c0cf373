"""What one look cannot show: verdicts that depend on training dynamics init does not have (issue 28 class 9).

A post-LN transformer is healthy at init by every measure ``check`` has (its gradient is flat through depth, its
units live), yet a deep one stalls in training without warmup: Adam's first large steps, amplified through the
stack of post-block norms, push it where its gradient vanishes (Liu et al. 2020, "Understanding the Difficulty of
Training Transformers"; Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"). Saying "No
findings" there would be a verdict init cannot give; the rule says so, as information, and what would show it.
"""

from __future__ import annotations

from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import Finding
from gradmedic.diagnosis.rules._common import finding
from gradmedic.diagnosis.rules._registry import Rule, register
from gradmedic.trace import Trace

__all__ = ["untested_dynamics"]

# Post-LN blocks from which init cannot vouch for training. Liu et al. 2020 (Fig. 1): a 6-layer post-LN
# Transformer trains on WMT14 En-De without warmup's help while an 18-layer one diverges; the corpus
# (tests/handwritten.py, SICK 9; benchmarks/handwritten_calibration.md) measures a 24-layer post-LN stack at width
# 128 stalling at Adam 1e-3 without warmup (cross-entropy 4.31 -> 2.94, the pre-LN twin 0.035) while its gradient at
# init is flat (profile worst 0.79). 12 lies between the depth that trains (6) and the one that does not (18), and
# is BERT-base's depth, which needed 10k warmup steps.
POST_LN_UNTESTED_BLOCKS = 12


def untested_dynamics(trace: Trace, ctx: Context) -> list[Finding]:
    """Information where a gm.check (at init, or after its few steps) cannot tell whether the model trains."""
    check = trace.meta.get("check")
    if (check is None or ctx.model_kind != "transformer" or ctx.norm_placement != "post"
            or ctx.blocks < POST_LN_UNTESTED_BLOCKS):
        return []
    blocks = [k for k, r in trace.meta.get("roles", {}).items() if r == "block"]
    seen = f"after {check.get('steps', 0)} step(s)" if check.get("steps") else "at init"
    return [finding("untested_dynamics", "info", blocks[:1],
                    f"{ctx.blocks} post-LN blocks: healthy {seen} says little, since a post-LN stack this deep "
                    "often stalls in its first hundreds of steps without learning-rate warmup; what would show it "
                    "is training: gm.check(..., steps=200) with your optimizer and schedule, or a gm.Monitor in "
                    "your own loop.", {"blocks": ctx.blocks, "norm_placement": "post", "steps": check.get("steps", 0)},
                    ctx)]


def rank_untested(ctx: Context) -> list[str]:
    return ["lr_warmup", "pre_ln"]


register(Rule("untested_dynamics", untested_dynamics, rank_untested))
