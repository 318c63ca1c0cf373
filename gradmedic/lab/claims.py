"""The claims table: each common claim, the experiment that tests it, the numbers, and a verdict over seeds.

A claim rests on a few ``Check``s, each a measured number against a cut-off ("he loss < 1.15", "gaussian
Jacobian condition > 100 x orthogonal's"), computed separately for every seed. A seed *agrees* with the
claim when all its checks hold, and is *clear* when every check it rests on is at least ``CLEAR`` times
away from its cut-off (for a seed that disagrees: the check that fails is). The verdict is

- "supported" when every seed agrees and every seed is clear,
- "not supported" when no seed agrees and every seed is clear,
- "inconclusive" otherwise, saying why (the seeds disagree, or a number sits within ``CLEAR`` of its
  cut-off), and "not run" when the suite lacks the experiment;
- "not tested at this budget" when the runs cannot test the claim: the claim's precondition is not met (no
  run stalled, so there is nothing to rescue), or the suite's budgets are too small for any claim (``smoke``:
  its numbers only show that every code path runs). A verdict from such runs would read as evidence.

Where the seeds ran different runs (an experiment with ``Experiment.seeds``: the deepest transformers run one
seed), a seed votes only when it ran every one of the claim's runs (``Claim.cells``) that some other seed ran;
a seed that ran fewer cannot see what the missing runs decide (seed 1 ran pre-LN at 24 blocks only, seed 0 at 24,
96 and 384: seed 1's "trains" never saw the deep stacks). Its numbers stay in the evidence, and the verdict names
it ("not supported, 1/1 seed (seed 1 lacks pre d=96: no vote)"). Seeds whose runs differ without one holding
the other's all vote. Where every seed ran the same runs (every other experiment) the rule changes nothing.

The evidence gives each number as its median over seeds with the [min, max] interval over seeds. Verdicts
are computed from the stored results, never written by hand. "Trains" means the final training loss (mean
of the last 10% of steps) is below ``TRAINS`` x the task's input-blind baseline, "stalls" above ``STALLS`` x.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median
from typing import Any

from gradmedic._errors import GradmedicError, first_line
from gradmedic.lab.claim_checks import CHECKS, LITERATURE, PRECONDITIONS, Check
from gradmedic.lab.depth_checks import DEPTH_CELLS, DEPTH_CHECKS, DEPTH_LITERATURE, DEPTH_PRECONDITIONS
from gradmedic.lab.rows import check_rows

__all__ = ["CLAIMS", "CLEAR", "NOT_TESTED", "Check", "Claim", "Verdict", "fmt", "group_results", "judge"]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_RUN = "supported", "not supported", "inconclusive", "not run"
NOT_TESTED = "not tested at this budget"
# A number within 25% of its cut-off is too close to call: the issue that introduced this rule saw a 30-layer
# ReLU net's loss move from 1.39 to 1.75 between CPU kernels alone, and a verdict flip at 1.17 against 1.15.
CLEAR = 1.25

Results = dict[str, dict[str, list[dict[str, Any]]]]  # experiment -> label -> results over seeds
View = dict[str, dict[str, Any]]  # label -> the result of one seed


@dataclass(frozen=True)
class Verdict:
    claim: str
    experiment: str
    verdict: str  # SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_RUN or NOT_TESTED
    evidence: str  # every number: median [min, max] over seeds, with its cut-off
    agreement: str = ""  # "3/3 seeds" agree with the claim
    why: str = ""  # for an inconclusive verdict: what made it so
    unvoted: str = ""  # the seeds that ran fewer of the claim's runs than another, and what they lack (no vote)
    literature: str = ""  # the figure the literature reports, to read beside ours

    @property
    def summary(self) -> str:
        """The verdict as the table prints it: "supported, 3/3 seeds" or "inconclusive (seeds disagree: 2/3)"."""
        if self.verdict == NOT_RUN:
            return NOT_RUN
        if self.verdict == NOT_TESTED:  # decided over every seed's runs, not by a vote
            return f"{self.verdict} ({self.why})"
        unvoted = f"{self.unvoted}: no vote" if self.unvoted else ""
        if self.verdict == INCONCLUSIVE:
            return f"{self.verdict} ({'; '.join(filter(None, (self.why, unvoted)))})"
        return f"{self.verdict}, {self.agreement}" + (f" ({unvoted})" if unvoted else "")


@dataclass(frozen=True)
class Claim:
    text: str
    experiment: str
    checks: Callable[[View], list[Check]]  # one seed's results by label -> its checks (empty: cannot judge)
    literature: str = ""
    # over all seeds' views: why the experiment cannot test the claim (e.g. no run stalled), or None
    precondition: Callable[[list[View]], str | None] | None = None
    # the experiment gives some runs fewer seeds (Experiment.seeds: the deepest transformers): a seed's view holds
    # the runs made under it, rather than only seeds that every run has
    fewer_seeds: bool = False
    # which of the experiment's runs (by label) the claim's judgement reads; None: all of them. A seed whose runs
    # among these are fewer than another seed's (a strict subset) has no vote (``_unvoted``)
    cells: Callable[[str], bool] | None = None


def group_results(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> Results:
    """(config, result) pairs -> experiment -> label -> results, ordered by seed (each result gets its seed).
    A row without its experiment, label or seed is one GradmedicError line (``rows.check_rows``)."""
    check_rows(rows)
    out: Results = {}
    for config, result in sorted(rows, key=lambda row: row[0].get("seed", 0)):
        out.setdefault(config["experiment"], {}).setdefault(config["label"], []).append(
            {**result, "seed": config.get("seed", 0)})
    return out


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "diverged" if value > 0 else "-inf"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.1e}"


def _views(res: dict[str, list[dict[str, Any]]], fewer_seeds: bool = False) -> list[tuple[int, View]]:
    """One view per seed that every label of the experiment has run under; with ``fewer_seeds``, one per seed
    that any label has run under, holding the labels run under it."""
    by_label = [{r["seed"] for r in runs} for runs in res.values()]
    seeds = sorted(set.union(*by_label) if fewer_seeds else set.intersection(*by_label))
    return [(s, {label: r for label, runs in res.items() for r in runs if r["seed"] == s}) for s in seeds]


def _unvoted(views: list[tuple[int, View]], cells: Callable[[str], bool] | None) -> dict[int, list[str]]:
    """seed -> the claim's runs it lacks, for each seed whose runs among the claim's cells are a strict subset of
    another seed's (against the seed that ran the most of them); the others vote."""
    ran = {seed: [label for label in view if cells is None or cells(label)] for seed, view in views}
    out = {}
    for seed, labels in ran.items():
        wider = [other for other in ran.values() if set(labels) < set(other)]
        if wider:
            out[seed] = sorted((label for label in max(wider, key=len) if label not in labels), key=_natural)
    return out


def _natural(label: str) -> list[str | int]:
    """Sort key: "pre d=96" before "pre d=384" (re.split keeps the digit runs at the odd places of every label)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


def _unvoted_text(unvoted: dict[int, list[str]], most: int = 4) -> str:
    """"seed 1 lacks pre d=96, pre d=384", at most ``most`` labels a seed (then "and N more")."""
    def lacks(labels):
        return ", ".join(labels[:most]) + (f" and {len(labels) - most} more" if len(labels) > most else "")
    return "; ".join(f"seed {seed} lacks {lacks(labels)}" for seed, labels in unvoted.items())


def _interval(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    mid = fmt(median(finite))
    if len(finite) == 1 or min(finite) == max(finite):
        return mid
    return f"{mid} [{fmt(min(finite))}, {fmt(max(finite))}]"


def _evidence(per_seed: list[list[Check]]) -> str:
    names: dict[str, list[Check]] = {}
    for checks in per_seed:
        for c in checks:
            names.setdefault(c.name, []).append(c)
    parts = []
    for name, checks in names.items():
        text = f"{name} {_interval([c.value for c in checks])}"
        if checks[0].op is not None:
            text += f" ({checks[0].op} {_interval([c.cutoff for c in checks])})"
        parts.append(text)
    return "; ".join(parts)


def _seed_outcome(checks: list[Check]) -> tuple[bool, bool, Check | None]:
    """(agrees, clear, the check that is too close or that fails) for one seed."""
    judged = [c for c in checks if c.op is not None]
    agrees = all(c.ok for c in judged)
    if agrees:
        close = next((c for c in judged if c.margin < CLEAR), None)
        return True, close is None, close
    failing = [c for c in judged if not c.ok]
    clear = next((c for c in failing if c.margin >= CLEAR), None)
    return False, clear is not None, clear if clear is not None else failing[0]


@contextmanager
def _unreadable(claim: Claim, seed: int | None) -> Iterator[None]:
    """A result that lacks a field a claim reads, or holds text where a number belongs (a database from
    elsewhere), as one GradmedicError line naming the experiment, the seed and the field."""
    try:
        yield
    except GradmedicError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as error:
        what = f"has no field {error.args[0]!r}" if isinstance(error, KeyError) and error.args else \
            f"holds something else than it reads ({type(error).__name__}: {first_line(error)})"
        where = f"experiment {claim.experiment!r}" + ("" if seed is None else f", seed {seed}")
        raise GradmedicError(f"a lab result ({where}) {what}, which the claim {claim.text[:60]!r} reads; rows "
                             "written by gradmedic lab run always have it: delete the row (or rerun the suite "
                             "into a new --db path).") from None


def _agree_text(agree: int, n: int) -> str:
    """"the seed agrees", "all 3 seeds agree", "none of 3 seeds agrees" (not "no 1 seeds agree")."""
    if n == 1:
        return "the seed agrees" if agree else "the seed disagrees"
    return f"all {n} seeds agree" if agree else f"none of {n} seeds agrees"


def judge_claim(claim: Claim, res: dict[str, list[dict[str, Any]]], tests_claims: bool = True) -> Verdict:
    per_seed, outcomes, silenced = [], [], {}
    views = _views(res, claim.fewer_seeds)
    unvoted = _unvoted(views, claim.cells)
    for seed, view in views:
        with _unreadable(claim, seed):
            checks = claim.checks(view)
        if checks:
            per_seed.append(checks)  # every seed's numbers are evidence; only the voters' outcomes judge
            if seed in unvoted:
                silenced[seed] = unvoted[seed]  # named: it had checks, so a vote to lose
            else:
                outcomes.append((seed, *_seed_outcome(checks)))
    base = Verdict(claim.text, claim.experiment, NOT_RUN, "", literature=claim.literature)
    if not outcomes:
        return base
    n, agree = len(outcomes), sum(o[1] for o in outcomes)
    evidence = _evidence(per_seed)
    with _unreadable(claim, None):
        unmet = claim.precondition([v for _, v in views]) if claim.precondition else None
    if not tests_claims:
        verdict, why = NOT_TESTED, "this suite only runs the code paths; run the quick or full suite"
    elif unmet:
        verdict, why = NOT_TESTED, unmet
    elif 0 < agree < n:
        verdict, why = INCONCLUSIVE, f"seeds disagree: {agree}/{n} agree"
    else:
        unclear = [(seed, check) for seed, _, clear, check in outcomes if not clear]
        if unclear:
            seed, check = unclear[0]
            verdict = INCONCLUSIVE
            why = (f"{_agree_text(agree, n)}, but {check.name} {fmt(check.value)} is within "
                   f"{CLEAR}x of its cut-off {fmt(check.cutoff)} (seed {seed})")
        else:
            verdict, why = (SUPPORTED if agree else NOT_SUPPORTED), ""
    agreement = f"{agree if agree else n}/{n} seed{'s' if n > 1 else ''}"
    return Verdict(claim.text, claim.experiment, verdict, evidence, agreement, why, _unvoted_text(silenced),
                   claim.literature)


_CHECKS, _LITERATURE = {**CHECKS, **DEPTH_CHECKS}, {**LITERATURE, **DEPTH_LITERATURE}
_PRECONDITIONS = {**PRECONDITIONS, **DEPTH_PRECONDITIONS}
CLAIMS: tuple[Claim, ...] = tuple(Claim(text, experiment, _CHECKS[key], _LITERATURE.get(key, ""),
                                        _PRECONDITIONS.get(key), experiment == "transformer_depth",
                                        DEPTH_CELLS.get(key))
                                  for key, (text, experiment) in {
    "nielsen": ("In a deep sigmoid net the first layers get far smaller gradients than the last", "nielsen"),
    "activations": ("Non-saturating activations (ReLU, GELU) keep gradients through depth better than "
                    "sigmoid/tanh, each at its standard init", "activations"),
    "deeper": ("Deeper networks help (with a path for the gradient: residual connections)", "depth"),
    "he": ("He init lets a 30-layer ReLU net train where Xavier (Glorot) stalls", "init_relu"),
    "xavier": ("Xavier init trains a deep tanh net where N(0, 1) init saturates", "init_tanh"),
    "orthogonal": ("Orthogonal init keeps a deep tanh net's input-output Jacobian well conditioned (dynamical "
                   "isometry) where Gaussian init does not", "isometry"),
    "residual": ("Residual connections let a 30-layer net train", "residual_mlp"),
    "long": ("Long skip connections carry more gradient to the first layer", "residual_mlp"),
    "degradation": ("With BatchNorm, a deeper plain CNN trains worse than a shallower one; a deeper residual "
                    "CNN does not (degradation)", "resnet_cnn"),
    "batchnorm": ("BatchNorm lets a 20-layer sigmoid net train", "batchnorm"),
    "gated": ("LSTM and GRU learn the adding problem at lengths where a tanh RNN stays at the baseline",
              "rnn_adding"),
    "irnn": ("An IRNN (ReLU, identity recurrence) learns the adding problem", "rnn_adding"),
    "copy": ("LSTM and GRU learn the copy task at delays where a tanh RNN does not", "rnn_copy"),
    "clipping": ("Gradient clipping turns an exploding run into a converging one", "clipping"),
    "adaptive": ("Adaptive optimizers (RMSprop, Adam) train a deep sigmoid net where SGD stalls", "optimizers"),
    "redraw": ("Restarting learning (re-drawing the parameters when the gradient vanishes) rescues a run "
               "whose gradient vanished", "redraw"),
    "redo": ("Re-initialising dead units (ReDo) revives them and helps the loss", "recycling"),
    "accumulation": ("Gradient accumulation reduces vanishing gradients", "accumulation"),
    "capacity": ("Dropout, wider or deeper nets help vanishing gradients", "capacity"),
    "pre_ln": ("Pre-LN lets a deep transformer train without warmup, where post-LN needs warmup", "transformer"),
    "rezero": ("Scaled residual connections (ReZero, DeepNorm) let a very deep transformer train",
               "transformer_deep"),
    "post_warmup": ("Post-LN needs a learning-rate warmup, more so with depth", "transformer_depth"),
    "pre_deep": ("Pre-LN trains deep stacks without warmup", "transformer_depth"),
    "scaled_1000": ("DeepNorm, ReZero and LayerScale train transformers at 1000 layers", "transformer_depth"),
}.items())


def judge(results: Results, tests_claims: bool = True) -> list[Verdict]:
    """A verdict for every claim whose experiment has results. ``tests_claims=False`` (a suite whose budgets
    only exercise the code, ``Suite.tests_claims``): every claim is "not tested at this budget", with its numbers."""
    return [judge_claim(claim, results[claim.experiment], tests_claims) for claim in CLAIMS
            if results.get(claim.experiment)]
