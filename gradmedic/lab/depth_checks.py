"""The checks of the transformer depth experiment (``transformer_depth``, the ``depth`` suite), beside the
literature's figures.

The experiment gives the deepest runs fewer seeds (one at 96 blocks and beyond), so a seed's view holds the runs
made under it (``Claim.fewer_seeds``); a claim whose runs a seed lacks gives that seed no checks, and a seed that
ran fewer of the claim's runs (``DEPTH_CELLS``) than another has no vote (its numbers are evidence). "Learns" is
the lab's (``claim_checks.learns``): the final loss at least 10% of the baseline below it. At these budgets (60 to
400 steps) the deep models are part-way down; what separates the layouts is whether learning starts at all.
"""

from __future__ import annotations

from typing import Any

from gradmedic.lab.claim_checks import final_loss, learns, make_check, stalls
from gradmedic.lab.rows import label_number

__all__ = ["DEPTH_CELLS", "DEPTH_CHECKS", "DEPTH_LITERATURE", "DEPTH_PRECONDITIONS", "DEEP_STACK", "SCALED_DEPTH"]

# "deep stack" for the pre-LN claim: 24 blocks and more, BERT-large's depth, twice the 12 of BERT-base on which
# Xiong et al. (2020) compared pre-LN and post-LN
DEEP_STACK = 24
SCALED_DEPTH = 1000  # the depth of the claim: Wang et al. (2022) trained 1000-layer post-LN with DeepNorm
SCALED = ("deepnorm", "rezero", "layerscale")


def _by_depth(v: dict[str, Any], layout: str) -> dict[int, dict[str, Any]]:
    """depth -> result of ``layout``'s runs ("post d=24" for layout "post"; "post + warmup d=24" is another)."""
    return {label_number(k, "d="): r for k, r in v.items() if k.startswith(layout + " d=")}


def _stream(label: str, r: dict[str, Any]):
    """Reported: the stream's first/last-block gradient at init (what gm.check reads)."""
    return make_check(f"{label} stream gradient first/last block at init", (r.get("stream") or {}).get("ratio_init"))


def _post_warmup(v):
    """Post-LN learns without warmup when shallow (the shallowest depth) and, at the deepest depth where warmup
    lets it learn, stalls without. If warmup lets it learn at no depth beyond the shallowest on this seed, the
    deepest is judged (and the check on warmup fails); when that holds for every seed, the precondition says the
    claim was not tested (``_warmup_helped``)."""
    post, warm = _by_depth(v, "post"), _by_depth(v, "post + warmup")
    depths = sorted(set(post) & set(warm))
    if len(depths) < 2:
        return []
    shallow = depths[0]
    helped = [d for d in depths[1:] if learns("", warm[d]).ok]
    deep = max(helped) if helped else depths[-1]
    out = [learns(f"post-LN d={shallow} (no warmup)", post[shallow]),
           learns(f"post-LN + warmup d={deep}", warm[deep]), stalls(f"post-LN d={deep} (no warmup)", post[deep])]
    out += [make_check(f"post-LN d={d} loss (no warmup / warmup)", final_loss(post[d])) for d in depths]
    out += [make_check(f"post-LN + warmup d={d} loss", final_loss(warm[d])) for d in depths]
    return out + [_stream(f"post-LN d={d}", post[d]) for d in depths]


def _pre_deep(v):
    """Pre-LN (no warmup) learns at every depth of DEEP_STACK blocks and more; reported beside it, for the deepest,
    how much its last block changes the stream against its first (Liu et al. 2020: later blocks change it less)."""
    pre = {d: r for d, r in _by_depth(v, "pre").items() if d >= DEEP_STACK}
    if not pre:
        return []
    out = [learns(f"pre-LN d={d}", r) for d, r in sorted(pre.items())]
    deepest = max(pre)
    changes = (pre[deepest].get("stream") or {}).get("changes_trained") or []
    if len(changes) >= 2 and changes[0]:
        out.append(make_check(f"pre-LN d={deepest} relative update |f(x)|/|x|, last block / first, trained",
                              changes[-1] / changes[0]))
    return out + [_stream(f"pre-LN d={d}", r) for d, r in sorted(pre.items())]


def _scaled(v):
    """DeepNorm, ReZero and LayerScale each learn at the deepest depth run, when it is SCALED_DEPTH or more (a seed
    without such runs gives no checks: its shallower runs say nothing of 1000 layers); the other layouts' losses
    there are reported."""
    out = []
    for layout in SCALED:
        runs = {d: r for d, r in _by_depth(v, layout).items() if d >= SCALED_DEPTH}
        if runs:
            d = max(runs)
            out += [learns(f"{layout} d={d}", runs[d]), _stream(f"{layout} d={d}", runs[d])]
    if not out:
        return []
    for layout in ("post", "post + warmup", "pre"):
        runs = {d: r for d, r in _by_depth(v, layout).items() if d >= SCALED_DEPTH}
        if runs:
            out.append(make_check(f"{layout} d={max(runs)} loss", final_loss(runs[max(runs)])))
    return out


def _warmup_helped(views):
    """"Needs warmup" is a claim of necessity: it can be told only where warmup lets post-LN learn. Where post-LN
    stalls with and without warmup at every depth beyond the shallowest, depth defeats it either way (Liu et al.
    2020 saw 18-layer post-LN fail with warmup), and the runs cannot say whether warmup is needed."""
    tried = []
    for v in views:
        post, warm = _by_depth(v, "post"), _by_depth(v, "post + warmup")
        depths = sorted(set(post) & set(warm))
        for d in depths[1:]:
            if learns("", warm[d]).ok:
                return None
            tried.append(f"d={d} seed {warm[d].get('seed', '?')}: {final_loss(warm[d]):.3g}")
    if not tried:
        return None  # no deeper depth with both runs: the checks are empty and the claim reads "not run"
    return ("post-LN + warmup learned at no depth beyond the shallowest (loss " + ", ".join(tried) + "), so "
            "whether warmup is needed cannot be told from depth's own failure")


def _reached_scaled_depth(views):
    deepest = max((label_number(k, "d=") for v in views for k in v), default=0)
    return None if deepest >= SCALED_DEPTH else f"the deepest run has {deepest} blocks, not {SCALED_DEPTH}"


def _reached_deep_stack(views):
    deepest = max((label_number(k, "d=") for v in views for k in v), default=0)
    return None if deepest >= DEEP_STACK else f"the deepest run has {deepest} blocks, fewer than {DEEP_STACK}"


DEPTH_CHECKS = {"post_warmup": _post_warmup, "pre_deep": _pre_deep, "scaled_1000": _scaled}
DEPTH_PRECONDITIONS = {"post_warmup": _warmup_helped, "pre_deep": _reached_deep_stack,
                       "scaled_1000": _reached_scaled_depth}
DEPTH_LITERATURE = {
    "post_warmup": "Xiong et al. 2020: post-LN's gradient near the output is large at init, so without warmup it "
                   "trains worse or diverges; Liu et al. 2020 (Admin): 18-layer post-LN fails to converge where "
                   "6-layer converges (both with warmup)",
    "pre_deep": "Xiong et al. 2020: pre-LN trains without warmup; Liu et al. 2020 (Admin): in pre-LN each block's "
                "output changes the growing stream less as depth grows (shown qualitatively), which caps what "
                "depth adds",
    "scaled_1000": "Wang et al. 2022 (DeepNet): DeepNorm trains a 1000-layer (2,500-sublayer) post-LN "
                   "transformer stably; Bachlechner et al. 2020: ReZero trains 128-layer transformers; Touvron "
                   "et al. 2021 (CaiT): LayerScale trains deeper image transformers (up to 36 blocks)",
}


def _cells(layouts: tuple[str, ...], min_depth: int = 0):
    """The runs a claim's verdict reads: ``layouts`` at ``min_depth`` blocks and more (the label "pre d=96")."""
    return lambda label: label.rsplit(" d=", 1)[0] in layouts and label_number(label, "d=") >= min_depth


# for Claim.cells: a seed that ran fewer of these than another has no vote on the claim. Post-LN's claim reads both
# layouts at every depth (its decisive depth is the deepest where warmup helps); the others only what they judge
DEPTH_CELLS = {"post_warmup": _cells(("post", "post + warmup")), "pre_deep": _cells(("pre",), DEEP_STACK),
               "scaled_1000": _cells(SCALED, SCALED_DEPTH)}
