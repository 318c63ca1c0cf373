"""Named grids of lab runs. An experiment is a set of labelled configurations that answer one question;
a suite is a list of experiments at one budget, each run under one or more seeds.

The budgets were chosen by measurement on a 2-core laptop-class CPU: ``quick`` finishes in about three
minutes with two workers (BENCHMARKS.md), ``full`` runs more depths, lengths and three seeds.
``smoke`` is a seconds-long grid that exercises every code path (tests use it).
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


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    experiments: tuple[Experiment, ...]
    seeds: tuple[int, ...] = (0,)
    configs: list[dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        configs = [{"experiment": e.name, "label": label, **config, "seed": seed}
                   for e in self.experiments for label, config in e.runs for seed in self.seeds]
        object.__setattr__(self, "configs", configs)

    def experiment(self, name: str) -> Experiment | None:
        return next((e for e in self.experiments if e.name == name), None)


def _mlp(steps: int, optimizer: str = "adam", lr: float = 1e-3, **spec: Any) -> dict[str, Any]:
    return {"task": "digits", "model": "mlp", "spec": spec, "optimizer": optimizer, "lr": lr, "steps": steps}


_OPTIMIZER_RUNS = (("sgd", "sgd", 1.0, "none"), ("momentum", "momentum", 0.1, "none"),
                   ("rmsprop", "rmsprop", 1e-2, "none"), ("adam", "adam", 1e-2, "none"),
                   ("adam + exp decay", "adam", 1e-2, "exp"), ("sgd + warm restarts", "sgd", 1.0, "restarts"))


def _experiments(scale: str) -> tuple[Experiment, ...]:
    """The grids at one scale: "smoke", "quick" or "full"."""
    quick, full = scale == "quick", scale == "full"
    s = {"smoke": 30, "quick": 300, "full": 600}[scale]  # steps of an MLP/CNN run
    depths = {"smoke": (3, 6), "quick": (5, 10, 20), "full": (5, 10, 20, 30)}[scale]
    deep = {"smoke": 8, "quick": 30, "full": 30}[scale]  # the "very deep" MLP of the init/residual runs
    cnn_depths = {"smoke": (3, 6), "quick": (4, 16), "full": (4, 10, 20)}[scale]
    lengths = {"smoke": (10,), "quick": (20, 50), "full": (20, 50, 100, 200)}[scale]
    rnn_steps = {"smoke": 40, "quick": 500, "full": 1500}[scale]
    exps = [
        Experiment("nielsen", "Per-layer gradients of a sigmoid [64, 30, 30, 30, 30, 10] net (Nielsen ch. 5)",
                   (("sigmoid", _mlp(s, "sgd", 0.5, depth=4, width=30, activation="sigmoid")),)),
        Experiment("depth_activation", "Depth x activation, default init, Adam",
                   tuple((f"{act} d={d}", _mlp(s, depth=d, activation=act))
                         for act in ("sigmoid", "tanh", "relu", "gelu") for d in depths)),
        Experiment("init_relu", f"{deep}-layer ReLU MLP: Glorot (Xavier, gain 1) vs He init, SGD + momentum "
                   "(He et al. 2015)",
                   tuple((init, _mlp(2 * s, "momentum", 0.01, depth=deep, activation="relu", init=init))
                         for init in ("glorot", "he"))),
        Experiment("init_tanh", "20-layer tanh MLP: N(0, 1) vs Xavier vs orthogonal init, SGD + momentum",
                   tuple((init, _mlp(s, "momentum", 0.01, depth=20 if scale != "smoke" else 6, activation="tanh",
                                     init=init)) for init in ("normal1", "xavier", "orthogonal"))),
        Experiment("residual_mlp", f"{deep}-layer ReLU MLP, default init: plain vs residual vs ReZero vs long skips",
                   tuple((skip, _mlp(s, depth=deep, activation="relu", skip=skip, skip_every=3))
                         for skip in ("none", "residual", "rezero", "long"))),
        Experiment("resnet_cnn", "Plain vs residual CNN on 8x8 digits at several depths (He et al. 2016)",
                   tuple((f"{'residual' if skip == 'residual' else 'plain'} d={d}",
                          {"task": "digits_image", "model": "cnn", "spec": {"depth": d, "channels": 16, "skip": skip},
                           "lr": 3e-3, "steps": s if not quick else 200})
                         for skip in ("none", "residual") for d in cnn_depths)),
        Experiment("batchnorm", "20-layer sigmoid MLP with and without BatchNorm, SGD + momentum (Ioffe 2015)",
                   tuple((label, _mlp(s, "momentum", 0.05, depth=20 if scale != "smoke" else 6,
                                      activation="sigmoid", norm=norm))
                         for label, norm in (("plain", "none"), ("batchnorm", "batch")))),
        Experiment("rnn_adding", "Adding problem over T steps: tanh RNN vs LSTM vs GRU vs IRNN",
                   tuple((f"{cell} T={t}", {"task": "adding", "length": t, "model": "rnn",
                                            "spec": {"cell": cell, "hidden": 32}, "steps": rnn_steps,
                                            "lr": 1e-3 if cell == "irnn" else 1e-2})
                         for t in lengths for cell in ("tanh", "lstm", "gru", "irnn")), kind="time"),
        Experiment("clipping", "10-layer He-init ReLU MLP at SGD lr 1.0 (explodes): clipping modes",
                   tuple((mode, {**_mlp(s, "sgd", 1.0, depth=10, activation="relu", init="he"), "clip": mode,
                                 "clip_level": {"value": 0.01, "agc": 0.01}.get(mode, 1.0)})
                         for mode in ("none", "norm", "value", "agc", "autoclip"))),
        Experiment("optimizers", "5-layer sigmoid MLP: SGD, momentum, RMSprop, Adam, decay, warm restarts",
                   tuple((label, {**_mlp(max(s, 400) if scale != "smoke" else s, opt, lr, depth=5,
                                         activation="sigmoid"), "schedule": sched})
                         for label, opt, lr, sched in _OPTIMIZER_RUNS)),
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
    ]
    if full:
        exps.append(Experiment("rnn_copy", "Copy task with delay T: tanh RNN vs LSTM vs GRU",
                               tuple((f"{cell} T={t}", {"task": "copy", "length": t, "model": "rnn",
                                                        "spec": {"cell": cell, "hidden": 64},
                                                        "steps": 2000, "lr": 3e-3})
                                     for t in (10, 30) for cell in ("tanh", "lstm", "gru")), kind="time"))
    return tuple(exps)


SUITES: dict[str, Suite] = {
    "smoke": Suite("smoke", "every experiment at a seconds-long budget (for tests; numbers mean little)",
                   _experiments("smoke")),
    "quick": Suite("quick", "the classic experiments, one seed, about 3 minutes on 2 CPU cores",
                   _experiments("quick")),
    "full": Suite("full", "more depths and lengths, the copy task, three seeds (about an hour on 2 cores)",
                  _experiments("full"), seeds=(0, 1, 2)),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise GradmedicError(f"No lab suite {name!r}; the suites are: {', '.join(SUITES)} "
                             "(see gradmedic lab list).")
    return SUITES[name]
