"""Named grids of lab runs. An experiment is a set of labelled configurations that answer one question;
a suite is a list of experiments at one budget, each run under one or more seeds.

The budgets were chosen by measurement on a 2-core laptop-class CPU: ``quick`` (three seeds) finishes in
about three minutes with two workers (BENCHMARKS.md); ``full`` runs more depths, lengths, the copy task and
48/100-layer transformers under five seeds. ``smoke`` is a tiny grid that exercises every code path (tests use
it; about 25 s of CPU time, 1-2 min of wall time with two workers): its budgets test no claim, so its claims
read "not tested at this budget". ``settle`` holds the settings that decide claims ``quick`` leaves inconclusive
within a CPU budget (so far the adding problem at T=100); ``depth`` the transformers at 6 to 1000 blocks. Each
configuration was chosen far from its claim's cut-offs under several seeds and CPU kernels
(``ATEN_CPU_CAPABILITY``), so that a verdict does not hang on the last bits of a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradmedic._errors import GradmedicError

__all__ = ["SUITES", "Experiment", "Suite", "get_suite"]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    runs: tuple[tuple[str, dict[str, Any]], ...]  # (label, configuration without seed)
    kind: str = "curves"  # what the report draws: "curves" (loss + per-layer bars) or "time" (dL/dx_t)
    # (label, seeds) for runs given fewer seeds than the suite's (the deepest, whose steps cost the most)
    seeds: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def seeds_of(self, label: str, default: tuple[int, ...]) -> tuple[int, ...]:
        return dict(self.seeds).get(label, default)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    experiments: tuple[Experiment, ...]
    seeds: tuple[int, ...] = (0,)
    tests_claims: bool = True  # False: budgets too small to judge a claim (the claims read "not tested")
    configs: list[dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        configs = [{"experiment": e.name, "label": label, **config, "seed": seed}
                   for e in self.experiments for label, config in e.runs for seed in e.seeds_of(label, self.seeds)]
        object.__setattr__(self, "configs", configs)

    def experiment(self, name: str) -> Experiment | None:
        return next((e for e in self.experiments if e.name == name), None)


def _mlp(steps: int, optimizer: str = "adam", lr: float = 1e-3, **spec: Any) -> dict[str, Any]:
    return {"task": "digits", "model": "mlp", "spec": spec, "optimizer": optimizer, "lr": lr, "steps": steps}


_OPTIMIZER_RUNS = (("sgd", "sgd", 1.0, "none"), ("momentum", "momentum", 0.1, "none"),
                   ("rmsprop", "rmsprop", 1e-2, "none"), ("adam", "adam", 1e-2, "none"),
                   ("adam + exp decay", "adam", 1e-2, "exp"))
# each activation at the init made for it: Xavier/Glorot (scaled by the activation's gain) for the saturating
# ones, He for the rectifiers
_STANDARD_INIT = {"sigmoid": "xavier", "tanh": "xavier", "relu": "he", "gelu": "he"}
# the adding problem in the configuration of the literature (hidden 64, Adam 1e-3, clip norm 1, LSTM forget
# bias 1), which an independent implementation matched (T=100: LSTM 0.0019, GRU 0.00045 test MSE)
_RNN_LITERATURE = {"spec": {"hidden": 64}, "lr": 1e-3, "clip": "norm", "clip_level": 1.0}


def _rnn(task: str, length: int, cell: str, steps: int, lr: float = _RNN_LITERATURE["lr"]) -> dict[str, Any]:
    spec = {**_RNN_LITERATURE["spec"], "cell": cell, **({"forget_bias": True} if cell == "lstm" else {})}
    return {"task": task, "length": length, "model": "rnn", "spec": spec, "lr": lr, "clip": "norm",
            "clip_level": 1.0, "steps": steps}


def _transformer(depth: int, variant: str, steps: int, warmup: int = 0, lr: float = 5e-3) -> dict[str, Any]:
    # lr 5e-3 (Adam): measured at depth 8, 300 steps: post-LN stays at the baseline (2.79 against ln 16 =
    # 2.77), post-LN with 75 warmup steps 1.78, pre-LN 1.54, ReZero 1.38; at depth 2 post-LN learns (0.40)
    config = {"task": "recall", "length": 4, "model": "transformer", "spec": {"depth": depth, "variant": variant},
              "lr": lr, "steps": steps, "batch": 32}
    return {**config, "warmup": warmup} if warmup else config


# The depth experiment (issue 30): a narrow transformer (width 16, 2 heads, feed-forward 32) on associative recall
# at 6 to 1000 blocks. Measured at 6 blocks, Adam 3e-3, seeds 0-2: every layout learns within 400 steps (final loss
# 1.33-1.83 against ln 16 = 2.77), its loss first falling below 2.49 ("learns") between steps 72 and 132; so a
# deep run needs about 200 steps before its failure to learn says anything. A step of 1000 blocks costs ~5 s on
# one CPU core of this (shared) machine, ~1000 s a run: the deepest depths run one seed, and only the layouts their
# claims are about. DEPTH_RUNS: (depth, steps, seeds, layouts), in the order they run (the 1000-block runs of the
# claim before 96 and 384, so that an interrupted suite has the claim's runs first).
# DeepNorm + warmup: Wang et al. (2022) trained DeepNorm with a warmup, and without one (this recipe) it stalls
# from 96 blocks on; it runs where it would tell the two apart (96 and 384 blocks), as post-LN + warmup does.
DEPTH_LAYOUTS = (("post", "post", False), ("post + warmup", "post", True), ("pre", "pre", False),
                 ("deepnorm", "deepnorm", False), ("deepnorm + warmup", "deepnorm", True), ("rezero", "rezero", False),
                 ("layerscale", "layerscale", False))
_ALL = ("post", "post + warmup", "pre", "deepnorm", "rezero", "layerscale")  # the layouts of issue 30, every depth
_SCALED = ("rezero", "layerscale", "deepnorm")
DEPTH_RUNS = ((6, 400, (0, 1, 2), _ALL), (24, 400, (0, 1), _ALL), (1000, 200, (0,), _SCALED),
              (96, 200, (0,), (*_ALL, "deepnorm + warmup")), (384, 200, (0,), ("pre", *_SCALED, "deepnorm + warmup")),
              (1000, 200, (0,), ("pre", "post + warmup")))


def _depth_experiment(depths: tuple[tuple[int, int, tuple[int, ...], tuple[str, ...]], ...]) -> Experiment:
    runs, seeds = [], []
    for d, steps, run_seeds, layouts in depths:
        for label, variant, warm in DEPTH_LAYOUTS:
            if label not in layouts:
                continue
            config = {"task": "recall", "length": 4, "model": "transformer",
                      "spec": {"depth": d, "variant": variant, "width": 16, "ff": 32}, "lr": 3e-3, "steps": steps,
                      "batch": 32, "fused": True}
            runs.append((f"{label} d={d}", {**config, "warmup": steps // 4} if warm else config))
            seeds.append((f"{label} d={d}", run_seeds))
    described = "; ".join(f"d={d}: {s} steps x {len(r)} seed{'s' * (len(r) > 1)}"
                          + ("" if set(_ALL) <= set(layouts) else f" ({', '.join(layouts)})")
                          for d, s, r, layouts in depths)
    return Experiment("transformer_depth", f"Transformer depth to {max(d for d, *_ in depths)} blocks on associative "
                      "recall (width 16, Adam 3e-3, warmup a quarter of the steps): post-LN, post-LN + warmup, "
                      "pre-LN, DeepNorm, ReZero, LayerScale, and DeepNorm + warmup at 96 and 384; fewer steps and "
                      f"seeds at depth ({described})",
                      tuple(runs), seeds=tuple(seeds))


def _depth_init_experiment(depths: tuple[int, ...]) -> Experiment:
    """The stream's gradient at init (one step: what ``gm.check`` reads before training) at every depth and seed,
    for the layouts whose init differs (post-LN + warmup is post-LN at init); a 1000-block step costs seconds."""
    runs = tuple((f"{label} d={d}", {"task": "recall", "length": 4, "model": "transformer",
                                     "spec": {"depth": d, "variant": variant, "width": 16, "ff": 32}, "lr": 3e-3,
                                     "steps": 1, "batch": 32, "fused": True})
                 for d in depths for label, variant, warm in DEPTH_LAYOUTS if not warm)
    return Experiment("transformer_depth_init", "The residual stream's gradient at init, first block over last, "
                      f"at {', '.join(map(str, depths))} blocks (one step, every seed)", runs)


def _experiments(scale: str) -> tuple[Experiment, ...]:
    """The grids at one scale: "smoke", "quick" or "full"."""
    full = scale == "full"
    smoke = scale == "smoke"
    s = {"smoke": 30, "quick": 300, "full": 600}[scale]  # steps of an MLP/CNN run
    deep = 8 if smoke else 30  # the "very deep" MLP of the init/residual runs
    mid = 6 if smoke else 20  # the deep tanh/sigmoid nets
    cnn_depths = {"smoke": (3, 6), "quick": (4, 16), "full": (4, 10, 20)}[scale]
    res_depths = {"smoke": (2, 4), "quick": (2, 8, 30), "full": (2, 8, 30, 50)}[scale]
    iso_depths = {"smoke": (6,), "quick": (20,), "full": (5, 20, 50)}[scale]
    lengths = {"smoke": (10,), "quick": (20,), "full": (20, 50, 100)}[scale]
    rnn_steps = {"smoke": 40, "quick": 600, "full": 3000}[scale]
    # quick: the literature's configuration at Adam 3e-3 so that 600 steps suffice (measured T=20, seeds
    # 0-2: LSTM 0.007-0.019, GRU 0.001-0.002; at 1e-3 the LSTM was still at 0.09-0.14 after 600 steps)
    rnn_lr = 1e-3 if full else 3e-3
    tf_depths = {"smoke": (2,), "quick": (8,), "full": (2, 8, 16)}[scale]
    tf_steps = {"smoke": 20, "quick": 300, "full": 600}[scale]
    exps = [
        Experiment("nielsen", "Per-layer gradients of a sigmoid [64, 30, 30, 30, 30, 10] net (Nielsen ch. 5)",
                   (("sigmoid", _mlp(min(s, 50), "sgd", 0.5, depth=4, width=30, activation="sigmoid")),)),
        Experiment("activations", f"{mid}-layer MLP, each activation at its standard init (Xavier for sigmoid/tanh, "
                   "He for ReLU/GELU), Adam",
                   tuple((act, _mlp(s, depth=mid, activation=act, init=init)) for act, init in _STANDARD_INIT.items())),
        Experiment("depth", "Depth with and without a gradient path: plain vs residual ReLU MLPs (test loss)",
                   (("plain d=5", _mlp(s, depth=5, activation="relu")),
                    *((f"residual d={d}", _mlp(s, depth=d, activation="relu", skip="residual")) for d in res_depths))),
        Experiment("init_relu", f"{deep}-layer ReLU MLP: Glorot (Xavier, gain 1) vs He init, SGD + momentum "
                   "(He et al. 2015)",
                   tuple((init, _mlp(30 if smoke else 800, "momentum", 0.002, depth=deep, activation="relu",
                                     init=init)) for init in ("glorot", "he"))),
        Experiment("init_tanh", f"{mid}-layer tanh MLP: N(0, 1) vs Xavier init, SGD + momentum",
                   tuple((init, _mlp(s, "momentum", 0.01, depth=mid, activation="tanh", init=init))
                         for init in ("normal1", "xavier"))),
        Experiment("isometry", "Input-output Jacobian of a deep tanh MLP at init: Gaussian vs orthogonal weights "
                   "(Saxe et al. 2014; Pennington et al. 2017)",
                   tuple((f"{label} d={d}", {**_mlp(1, depth=d, activation="tanh", init=init, gain=gain),
                                             "jacobian": True})
                         for d in iso_depths for label, init, gain in (("gaussian gain 1", "glorot", 1.0),
                                                                       ("orthogonal gain 1", "orthogonal", 1.0),
                                                                       ("orthogonal gain 5/3", "orthogonal", 0.0)))),
        Experiment("residual_mlp", f"{deep}-layer ReLU MLP, default init: plain vs residual vs ReZero vs long skips",
                   tuple((skip, _mlp(s, depth=deep, activation="relu", skip=skip, skip_every=3))
                         for skip in ("none", "residual", "rezero", "long"))),
        Experiment("resnet_cnn", "Plain vs residual CNN with BatchNorm on 8x8 digits at several depths "
                   "(He et al. 2016)",
                   tuple((f"{'residual' if skip == 'residual' else 'plain'} d={d}",
                          {"task": "digits_image", "model": "cnn",
                           "spec": {"depth": d, "channels": 16, "skip": skip, "norm": "batch"},
                           "lr": 3e-3, "steps": min(s, 200)})
                         for skip in ("none", "residual") for d in cnn_depths)),
        Experiment("batchnorm", f"{mid}-layer sigmoid MLP with and without BatchNorm, SGD + momentum (Ioffe 2015)",
                   tuple((label, _mlp(s, "momentum", 0.05, depth=mid, activation="sigmoid", norm=norm))
                         for label, norm in (("plain", "none"), ("batchnorm", "batch")))),
        Experiment("rnn_adding", f"Adding problem over T steps (hidden 64, Adam {rnn_lr:g}, clip 1, LSTM forget "
                   "bias 1): "
                   "tanh RNN vs LSTM vs GRU; IRNN (Le et al. 2015)",
                   tuple((f"{cell} T={t}", _rnn("adding", t, cell, rnn_steps, rnn_lr)) for t in lengths
                         for cell in ("tanh", "lstm", "gru"))
                   + tuple((f"irnn T={t}", {"task": "adding", "length": t, "model": "rnn",
                                            "spec": {"cell": "irnn", "hidden": 32}, "steps": min(rnn_steps, 500),
                                            "lr": 1e-3}) for t in lengths), kind="time"),
        Experiment("clipping", "Exploding recurrence (tanh RNN, orthogonal W_hh x 1.5, adding T=5, SGD lr 0.1): "
                   "clipping modes",
                   tuple((mode, {"task": "adding", "length": 5, "model": "rnn",
                                 "spec": {"cell": "tanh", "hidden": 32, "recurrent_gain": 1.5},
                                 "optimizer": "sgd", "lr": 0.1, "steps": 40 if smoke else 500, "clip": mode,
                                 "clip_level": {"value": 0.01, "agc": 0.01}.get(mode, 1.0)})
                         for mode in ("none", "norm", "value", "agc", "autoclip")), kind="time"),
        Experiment("optimizers", "5-layer sigmoid MLP: SGD, momentum, RMSprop, Adam, Adam with decay",
                   tuple((label, {**_mlp(s if smoke else max(s, 400), opt, lr, depth=5, activation="sigmoid"),
                                  "schedule": sched}) for label, opt, lr, sched in _OPTIMIZER_RUNS)),
        Experiment("redraw", "20-layer width-6 ReLU MLP, He init (often born dead: Lu et al. 2019): without and "
                   "with re-drawing the parameters when the gradient vanishes",
                   tuple((label, {**_mlp(40 if smoke else 500, "adam", 0.01, depth=20, width=6, activation="relu",
                                         init="he"), "redraw_patience": patience})
                         for label, patience in (("no restart", 0), ("re-draw on vanishing", 5)))),
        Experiment("recycling", "6-layer ReLU MLP at Adam lr 0.01 (units die): with and without ReDo recycling",
                   tuple((label, {**_mlp(s, "adam", 0.01, depth=6, activation="relu"), "recycle_every": every})
                         for label, every in (("no recycling", 0), ("recycle every 50", max(s // 6, 5))))),
        Experiment("accumulation", "10-layer sigmoid MLP: batch 16, batch 64, and 4 x 16 accumulated",
                   (("batch 16", {**_mlp(s, depth=10, activation="sigmoid"), "batch": 16}),
                    ("batch 64", {**_mlp(s, depth=10, activation="sigmoid"), "batch": 64}),
                    ("4 x 16 accumulated", {**_mlp(s, depth=10, activation="sigmoid"), "batch": 64,
                                            "accumulate": 4}))),
        Experiment("capacity", "10-layer sigmoid MLP: dropout, wider, deeper",
                   (("baseline", _mlp(s, depth=10, activation="sigmoid")),
                    ("dropout 0.2", _mlp(s, depth=10, activation="sigmoid", dropout=0.2)),
                    ("wider (256)", _mlp(s, depth=10, width=256, activation="sigmoid")),
                    ("deeper (20)", _mlp(s, depth=20, activation="sigmoid")))),
        Experiment("transformer", "Transformer LM on associative recall (4 pairs; d_model 32, 2 heads, Adam 1e-3): "
                   "post-LN, post-LN + warmup, pre-LN, ReZero",
                   ((("post d=2", _transformer(2, "post", tf_steps)),) if 2 not in tf_depths else ())  # shallow control
                   + tuple((f"{label} d={d}", _transformer(d, variant, tf_steps, warmup))
                           for d in tf_depths for label, variant, warmup in
                           (("post", "post", 0), ("post + warmup", "post", tf_steps // 4), ("pre", "pre", 0),
                            ("rezero", "rezero", 0)))),
    ]
    if full:
        exps.append(Experiment("rnn_copy", "Copy task with delay T (hidden 64, Adam 3e-3, clip 1): tanh RNN vs "
                               "LSTM vs GRU",
                               # measured T=10, 3,000 steps at Adam 3e-3 (seed 0): LSTM 0.49, GRU 0.60 against
                               # a baseline of 0.69, still learning; 10,000 steps has not been measured here
                               tuple((f"{cell} T={t}", _rnn("copy", t, cell, 10000, 3e-3)) for t in (10, 20)
                                     for cell in ("tanh", "lstm", "gru")), kind="time"))
        exps.append(Experiment("transformer_deep", "Transformer LM on associative recall at 48 and 100 layers: "
                               "post-LN vs ReZero vs DeepNorm",
                               tuple((f"{variant} d={d}", _transformer(d, variant, 400, lr=1e-3)) for d in (48, 100)
                                     for variant in ("post", "rezero", "deepnorm"))))
    return tuple(exps)


# The settle suite (issue 30): the settings that decide claims the quick suite leaves inconclusive, within a CPU
# budget. The adding problem at T=100 in the literature's configuration, where a tanh RNN cannot bridge the gap:
# measured under the `full` suite's 3,000 steps (seeds 0-2, avx2), the LSTM's loss stays below 0.1 only from step
# 2,450 (seed 2) or 2,950 (seed 0), not yet on seed 1, and ends at 0.015-0.126 (the "learned" bar is 0.033); the GRU
# from step 950-1,150, ending at 0.0013. 6,000 steps give the LSTM, after its escape, several times the ~650 steps
# the GRU needed to go from 0.1 to 0.002.
SETTLE_ADDING_STEPS = 6000
_SETTLE = (Experiment("rnn_adding", f"Adding problem over T=100 steps (hidden 64, Adam 1e-3, clip 1, LSTM forget bias "
                      f"1; {SETTLE_ADDING_STEPS} steps): tanh RNN vs LSTM vs GRU",
                      tuple((f"{cell} T=100", _rnn("adding", 100, cell, SETTLE_ADDING_STEPS))
                            for cell in ("tanh", "lstm", "gru")), kind="time"),)

SUITES: dict[str, Suite] = {
    "smoke": Suite("smoke", "every experiment at a tiny budget, for tests: runs every code path, tests no claim",
                   _experiments("smoke"), tests_claims=False),
    "quick": Suite("quick", "the classic experiments and a transformer, three seeds, about 3 minutes on 2 CPU "
                   "cores", _experiments("quick"), seeds=(0, 1, 2)),
    "depth": Suite("depth", "transformers at 6, 24, 96, 384 and 1000 blocks in seven layouts (post-LN with and "
                   "without warmup, pre-LN, DeepNorm with and without warmup, ReZero, LayerScale); 3 seeds at 6 "
                   "blocks down to 1 seed at 96 and beyond, where only some layouts run; about 2 hours on one CPU core",
                   (_depth_experiment(DEPTH_RUNS), _depth_init_experiment((6, 24, 96, 384, 1000))),
                   seeds=(0, 1, 2)),
    "settle": Suite("settle", "the budgets that decide claims the quick suite leaves inconclusive, three seeds: "
                    f"so far the adding problem at T=100 ({SETTLE_ADDING_STEPS} steps), about 30 minutes on one "
                    "CPU core", _SETTLE, seeds=(0, 1, 2)),
    "full": Suite("full", "more depths and lengths, the copy task, 48- and 100-layer transformers, five seeds "
                  "(hours on 2 cores)", _experiments("full"), seeds=(0, 1, 2, 3, 4)),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise GradmedicError(f"No lab suite {name!r}; the suites are: {', '.join(SUITES)} "
                             "(see gradmedic lab list).")
    return SUITES[name]
