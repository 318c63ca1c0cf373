"""The claims table: each common claim, the experiment that tests it, the numbers, and a verdict.

A verdict is computed from the stored results, never written by hand: "supported" when every measured
case agrees with the claim, "not supported" when none does, "mixed" otherwise, and "not run" when the
suite lacks the experiment. "Trains" means the final training loss (mean of the last 10% of steps) is
below half of the task's input-blind baseline; "stalls" means it stays above 90% of it. Numbers are
medians over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

__all__ = ["CLAIMS", "Claim", "Verdict", "group_results", "judge"]

SUPPORTED, NOT_SUPPORTED, MIXED, NOT_RUN = "supported", "not supported", "mixed", "not run"
TRAINS = 0.5  # final loss below this fraction of the baseline
STALLS = 0.9  # final loss above this fraction of the baseline
CLOSE = 2.0  # gradient ratios within this factor of each other are "unchanged"

Results = dict[str, dict[str, list[dict[str, Any]]]]  # experiment -> label -> results over seeds


@dataclass(frozen=True)
class Verdict:
    claim: str
    experiment: str
    verdict: str
    evidence: str


@dataclass(frozen=True)
class Claim:
    text: str
    experiment: str
    judge: Callable[[dict[str, list[dict[str, Any]]]], tuple[str, str]]  # label -> results => (verdict, evidence)


def group_results(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> Results:
    """(config, result) pairs -> experiment -> label -> results."""
    out: Results = {}
    for config, result in rows:
        out.setdefault(config["experiment"], {}).setdefault(config["label"], []).append(result)
    return out


def _m(runs: list[dict[str, Any]], key: str) -> float:
    """Median of a metric over seeds; a diverged run's loss counts as +inf, a missing ratio as NaN."""
    values = []
    for r in runs:
        v = r.get(key)
        if v is None:
            v = math.inf if key.endswith("loss") else math.nan
        values.append(float(v))
    finite = [v for v in values if not math.isnan(v)]
    return median(finite) if finite else math.nan


def _loss(runs: list[dict[str, Any]]) -> float:
    return _m(runs, "final_loss")


def _trains(runs: list[dict[str, Any]]) -> bool:
    return _loss(runs) < TRAINS * runs[0]["baseline"]


def _stalls(runs: list[dict[str, Any]]) -> bool:
    return _loss(runs) > STALLS * runs[0]["baseline"]


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "diverged"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.1e}"


def _verdict(oks: list[bool]) -> str:
    if not oks:
        return NOT_RUN
    return SUPPORTED if all(oks) else NOT_SUPPORTED if not any(oks) else MIXED


def _state(runs: list[dict[str, Any]]) -> str:
    return "trains" if _trains(runs) else "stalls" if _stalls(runs) else "partly"


def _loss_text(label: str, runs: list[dict[str, Any]]) -> str:
    return f"{label}: loss {fmt(_loss(runs))} ({_state(runs)})"


def _first_hidden_last_hidden(runs: list[dict[str, Any]]) -> list[float]:
    grads = runs[0]["gradients"]
    norms = grads["grad_norm"][0] if grads["grad_norm"] else []
    return [v if v is not None else math.nan for v in norms[:-1]]  # the head is not a hidden layer


def _nielsen(res):
    runs = res.get("sigmoid")
    if not runs:
        return NOT_RUN, ""
    hidden = _first_hidden_last_hidden(runs)
    rising = all(b > a for a, b in zip(hidden, hidden[1:], strict=False))
    ratio = hidden[0] / hidden[-1] if hidden and hidden[-1] else math.nan
    text = ("per-layer |dL/dW| at init, first to last hidden: " + ", ".join(fmt(v) for v in hidden)
            + f"; first/last = {fmt(ratio)} (Nielsen: about 1/70 for biases)")
    return _verdict([rising and ratio < 0.1]), text


def _by_depth(res, activation):
    rows = [(int(label.split("d=")[1]), runs) for label, runs in res.items() if label.startswith(activation + " ")]
    return sorted(rows, key=lambda r: r[0])


def _activations(res):
    if not res:
        return NOT_RUN, ""
    deepest = max(int(label.split("d=")[1]) for label in res)
    ratio = {act: _m(res[f"{act} d={deepest}"], "ratio_init") for act in ("sigmoid", "tanh", "relu", "gelu")
             if f"{act} d={deepest}" in res}
    oks = [ratio[a] > 10 * ratio[b] for a in ("relu", "gelu") for b in ("sigmoid", "tanh") if a in ratio and b in ratio]
    text = f"first/last gradient ratio at init, depth {deepest}: "
    text += ", ".join(f"{a} {fmt(v)}" for a, v in ratio.items())
    text += "; loss: " + ", ".join(f"{a} {fmt(_loss(res[f'{a} d={deepest}']))}" for a in ratio)
    return _verdict(oks), text


def _deeper(res):
    oks, parts = [], []
    for act in ("sigmoid", "tanh", "relu", "gelu"):
        rows = _by_depth(res, act)
        if len(rows) < 2:
            continue
        (d0, shallow), (d1, deep) = rows[0], rows[-1]
        better = _loss(deep) < _loss(shallow) and _m(deep, "ratio_init") >= _m(shallow, "ratio_init") / CLOSE
        oks.append(better)
        parts.append(f"{act} d={d0}->{d1}: loss {fmt(_loss(shallow))}->{fmt(_loss(deep))}, ratio "
                     f"{fmt(_m(shallow, 'ratio_init'))}->{fmt(_m(deep, 'ratio_init'))}")
    return _verdict(oks), "; ".join(parts)


def _a_trains_b_stalls(good: str, bad: str, extra: str = ""):
    def judge(res):
        if good not in res or bad not in res:
            return NOT_RUN, ""
        text = f"{_loss_text(good, res[good])}; {_loss_text(bad, res[bad])}"
        text += f"; gradient ratio at init {good} {fmt(_m(res[good], 'ratio_init'))}, {bad} " \
                f"{fmt(_m(res[bad], 'ratio_init'))}" + extra
        return _verdict([_trains(res[good]) and not _trains(res[bad])]), text
    return judge


def _orthogonal(res):
    if "orthogonal" not in res:
        return NOT_RUN, ""
    r = _m(res["orthogonal"], "ratio_init")
    others = ", ".join(f"{k} {fmt(_m(v, 'ratio_init'))}" for k, v in res.items() if k != "orthogonal")
    return _verdict([0.1 <= r <= 10]), f"first/last gradient ratio at init: orthogonal {fmt(r)}, {others}"


def _residual(res):
    if "none" not in res:
        return NOT_RUN, ""
    oks = [_trains(res[k]) and not _trains(res["none"]) for k in ("residual", "rezero") if k in res]
    text = "; ".join(_loss_text(k, v) + f", ratio at init {fmt(_m(v, 'ratio_init'))}" for k, v in res.items())
    return _verdict(oks), text


def _long_skips(res):
    if "long" not in res or "none" not in res:
        return NOT_RUN, ""
    a, b = _m(res["long"], "ratio_init"), _m(res["none"], "ratio_init")
    return _verdict([a > 10 * b]), f"first/last gradient ratio at init: long skips {fmt(a)}, plain {fmt(b)}"


def _resnet(res):
    plain = sorted((int(k.split("d=")[1]), v) for k, v in res.items() if k.startswith("plain"))
    resid = sorted((int(k.split("d=")[1]), v) for k, v in res.items() if k.startswith("residual"))
    if len(plain) < 2 or len(resid) < 2:
        return NOT_RUN, ""
    plain_worse = _loss(plain[-1][1]) > _loss(plain[0][1])
    resid_ok = _loss(resid[-1][1]) <= 1.1 * _loss(resid[0][1]) or _loss(resid[-1][1]) < _loss(plain[-1][1]) / 2
    text = "plain: " + ", ".join(f"d={d} loss {fmt(_loss(v))}" for d, v in plain)
    text += "; residual: " + ", ".join(f"d={d} loss {fmt(_loss(v))}" for d, v in resid)
    return _verdict([plain_worse, resid_ok]), text


def _rnn(cells):
    def judge(res):
        lengths = sorted({int(k.split("T=")[1]) for k in res})
        oks, parts = [], []
        for t in lengths:
            tanh = res.get(f"tanh T={t}")
            gated = [(c, res[f"{c} T={t}"]) for c in cells if f"{c} T={t}" in res]
            if not tanh or not gated:
                continue
            oks.append(_stalls(tanh) and all(_loss(r) < 0.2 * r[0]["baseline"] for _, r in gated))
            parts.append(f"T={t} (baseline {fmt(tanh[0]['baseline'])}): tanh {fmt(_loss(tanh))}, "
                         + ", ".join(f"{c} {fmt(_loss(r))}" for c, r in gated))
        return _verdict(oks), "; ".join(parts)
    return judge


def _irnn(res):
    rows = sorted((int(k.split("T=")[1]), v) for k, v in res.items() if k.startswith("irnn"))
    oks = [_trains(v) for _, v in rows]
    return _verdict(oks), "; ".join(f"T={t}: irnn loss {fmt(_loss(v))} (baseline {fmt(v[0]['baseline'])})"
                                     for t, v in rows)


def _clipping(res):
    if "none" not in res:
        return NOT_RUN, ""
    none = res["none"]
    exploded = any(r.get("diverged_at") is not None for r in none) or _stalls(none)
    modes = [k for k in res if k != "none"]
    oks = [exploded and _trains(res[k]) for k in modes]
    at = [r.get("diverged_at") for r in none if r.get("diverged_at") is not None]
    text = "no clipping: " + (f"diverged at step {min(at)}" if at else f"loss {fmt(_loss(none))}") + "; "
    text += ", ".join(f"{k} {fmt(_loss(res[k]))} ({_state(res[k])})" for k in modes)
    return _verdict(oks), text


def _adaptive(res):
    if "sgd" not in res:
        return NOT_RUN, ""
    oks = [_trains(res[k]) and not _trains(res["sgd"]) for k in ("rmsprop", "adam") if k in res]
    text = "; ".join(f"{k}: loss {fmt(_loss(v))}, steps to half baseline {_steps(v)}" for k, v in res.items())
    return _verdict(oks), text


def _steps(runs):
    s = _m(runs, "steps_to_target")
    return "never" if math.isnan(s) else str(int(s))


def _restarts(res):
    a, b = res.get("sgd + warm restarts"), res.get("sgd")
    if not a or not b:
        return NOT_RUN, ""
    return _verdict([_loss(a) < 0.9 * _loss(b)]), f"sgd constant lr: loss {fmt(_loss(b))}; sgd + warm restarts: " \
                                                   f"{fmt(_loss(a))}"


def _recycling(res):
    a, b = res.get("recycle every 50"), res.get("no recycling")
    if not a:
        a = next((v for k, v in res.items() if k.startswith("recycle")), None)
    if not a or not b:
        return NOT_RUN, ""
    fewer_dead = _m(a, "dead_frac") < _m(b, "dead_frac")
    text = (f"dead fraction at the end: {fmt(_m(b, 'dead_frac'))} without, {fmt(_m(a, 'dead_frac'))} with "
            f"({int(_m(a, 'recycled_units'))} units recycled); loss {fmt(_loss(b))} without, {fmt(_loss(a))} with")
    return _verdict([fewer_dead, _loss(a) <= _loss(b)]), text


def _accumulation(res):
    acc, big, small = res.get("4 x 16 accumulated"), res.get("batch 64"), res.get("batch 16")
    if not acc or not big or not small:
        return NOT_RUN, ""
    ra, rb, rs = (_m(x, "ratio_init") for x in (acc, big, small))
    text = f"first/last gradient ratio at init: batch 16 {fmt(rs)}, batch 64 {fmt(rb)}, 4 x 16 accumulated " \
           f"{fmt(ra)}; loss {fmt(_loss(small))} / {fmt(_loss(big))} / {fmt(_loss(acc))}"
    return _verdict([ra > CLOSE * rs]), text


def _capacity(res):
    base = res.get("baseline")
    if not base:
        return NOT_RUN, ""
    rb = _m(base, "ratio_init")
    oks, parts = [], [f"baseline ratio {fmt(rb)}, loss {fmt(_loss(base))}"]
    for k, v in res.items():
        if k == "baseline":
            continue
        r = _m(v, "ratio_init")
        oks.append(r > CLOSE * rb and _loss(v) < _loss(base))
        parts.append(f"{k}: ratio {fmt(r)}, loss {fmt(_loss(v))}")
    return _verdict(oks), "; ".join(parts)


CLAIMS: tuple[Claim, ...] = (
    Claim("In a deep sigmoid net the first layers get far smaller gradients than the last", "nielsen", _nielsen),
    Claim("Non-saturating activations (ReLU, GELU) keep gradients through depth better than sigmoid/tanh",
          "depth_activation", _activations),
    Claim("Deeper networks help", "depth_activation", _deeper),
    Claim("He init lets a 30-layer ReLU net train where Xavier (Glorot) stalls", "init_relu",
          _a_trains_b_stalls("he", "glorot")),
    Claim("Xavier init trains a deep tanh net where N(0, 1) init saturates", "init_tanh",
          _a_trains_b_stalls("xavier", "normal1")),
    Claim("Orthogonal init keeps a deep tanh net's first/last gradient ratio near 1", "init_tanh", _orthogonal),
    Claim("Residual connections let a 30-layer net train", "residual_mlp", _residual),
    Claim("Long skip connections carry more gradient to the first layer", "residual_mlp", _long_skips),
    Claim("A deeper plain CNN trains worse than a shallower one; a deeper residual CNN does not", "resnet_cnn",
          _resnet),
    Claim("BatchNorm lets a 20-layer sigmoid net train", "batchnorm", _a_trains_b_stalls("batchnorm", "plain")),
    Claim("LSTM and GRU learn the adding problem at lengths where a tanh RNN stays at the baseline", "rnn_adding",
          _rnn(("lstm", "gru"))),
    Claim("An IRNN (ReLU, identity recurrence) learns the adding problem", "rnn_adding", _irnn),
    Claim("LSTM and GRU learn the copy task at delays where a tanh RNN does not", "rnn_copy", _rnn(("lstm", "gru"))),
    Claim("Gradient clipping turns an exploding run into a converging one", "clipping", _clipping),
    Claim("Adaptive optimizers (RMSprop, Adam) train a deep sigmoid net where SGD stalls", "optimizers", _adaptive),
    Claim("Warm restarts escape a stalled SGD run", "optimizers", _restarts),
    Claim("Re-initialising dead units (ReDo) revives them and helps the loss", "recycling", _recycling),
    Claim("Gradient accumulation reduces vanishing gradients", "accumulation", _accumulation),
    Claim("Dropout, wider or deeper nets help vanishing gradients", "capacity", _capacity),
)


def judge(results: Results) -> list[Verdict]:
    """A verdict for every claim whose experiment has results."""
    out = []
    for claim in CLAIMS:
        res = results.get(claim.experiment)
        if not res:
            continue
        verdict, evidence = claim.judge(res)
        out.append(Verdict(claim.text, claim.experiment, verdict, evidence))
    return out
