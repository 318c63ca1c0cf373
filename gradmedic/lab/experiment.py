"""One lab run: a plain-JSON configuration in, a plain-JSON result out, the same on every call.

A configuration names a task, a model family with its spec fields, an optimizer and the remedies of the
training loop (clipping, recycling dead units, gradient accumulation, a learning-rate schedule). The
run is watched by a ``Monitor`` so that its per-layer gradient ratios (at init and as training goes)
come from the same probes a user gets, not from a second measuring path.

Keys (defaults in ``DEFAULTS``): ``task`` (digits | digits_image | pixel_digits | row_digits |
permuted_digits | adding | copy), ``length`` (adding/copy), ``model`` (mlp | cnn | rnn), ``spec`` (fields
of MLPSpec / CNNSpec / RNNSpec), ``optimizer`` (sgd | momentum | rmsprop | adam), ``lr``, ``schedule``
(none | step | exp | restarts), ``steps``, ``batch``, ``accumulate`` (micro-batches per step), ``clip``
(none | value | norm | autoclip | agc), ``recycle_every`` (steps; 0 = never), ``target`` (a training loss:
``steps_to_target`` is the first step whose 10-step mean is below it; default half the task's
baseline), ``seed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic.lab.models import CNNSpec, MLPSpec, RNNSpec, build_cnn, build_mlp, build_rnn
from gradmedic.lab.tasks import Task, adding, copy_task, digits, sequential_digits

__all__ = ["DEFAULTS", "make_task", "run_experiment"]

DEFAULTS: dict[str, Any] = {
    "task": "digits", "length": 0, "model": "mlp", "spec": {}, "optimizer": "adam", "lr": 1e-3,
    "schedule": "none", "steps": 200, "batch": 64, "accumulate": 1, "clip": "none", "clip_level": 1.0,
    "recycle_every": 0, "target": None, "seed": 0,
}
TASKS = ("digits", "digits_image", "pixel_digits", "row_digits", "permuted_digits", "adding", "copy")
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SCHEDULES = ("none", "step", "exp", "restarts")
CLIPS = ("none", "value", "norm", "autoclip", "agc")
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
CURVE_POINTS = 60  # the loss curve is kept at about this many points
SNAPSHOTS = 8  # per-layer gradient norms are recorded at about this many steps


def make_task(config: dict[str, Any]) -> Task:
    name, seed, length = config["task"], config["seed"], config["length"]
    if name in ("digits", "digits_image"):
        task = digits(seed)
        if name == "digits_image":
            task = Task(name, task.x_train.reshape(-1, 1, 8, 8), task.y_train, task.x_test.reshape(-1, 1, 8, 8),
                        task.y_test, task.loss, task.baseline, task.classes)
        return task
    if name in ("pixel_digits", "row_digits", "permuted_digits"):
        return sequential_digits(seed, pixelwise=name != "row_digits", permuted=name == "permuted_digits")
    if name == "adding":
        return adding(length, seed=seed)
    return copy_task(length, seed=seed)


def _build_model(config: dict[str, Any], task: Task) -> nn.Module:
    family = config["model"]
    spec_cls, build = {"mlp": (MLPSpec, build_mlp), "cnn": (CNNSpec, build_cnn), "rnn": (RNNSpec, build_rnn)}[family]
    known = {f.name for f in fields(spec_cls)}
    unknown = sorted(set(config["spec"]) - known)
    if unknown:
        raise bad_argument("spec", f"fields of {spec_cls.__name__} ({', '.join(sorted(known))})", unknown)
    spec = dict(config["spec"])
    out = task.classes if task.loss == "cross_entropy" else task.y_train.shape[-1]
    spec.setdefault("d_out", out)
    if family == "rnn":
        spec.setdefault("d_in", task.x_train.shape[-1])
        spec.setdefault("every_step", task.y_train.dim() == 2 and task.loss == "cross_entropy")
    elif family == "mlp":
        spec.setdefault("d_in", task.x_train.shape[-1])
    return build(spec_cls(**spec), seed=config["seed"])


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration with its defaults filled in; a GradmedicError names what is wrong."""
    if not isinstance(config, dict):
        raise GradmedicError(f"A lab configuration should be a dict, but given {type(config).__name__}.")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise bad_argument("config", f"keys among {sorted(DEFAULTS)}", unknown)
    full = {**DEFAULTS, **config}
    for key, allowed in (("task", TASKS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("clip", CLIPS),
                         ("model", ("mlp", "cnn", "rnn"))):
        if full[key] not in allowed:
            raise bad_argument(key, f"one of {allowed}", full[key])
    for key in ("steps", "batch", "accumulate"):
        if not isinstance(full[key], int) or full[key] < 1:
            raise bad_argument(key, "a positive int", full[key])
    if full["batch"] % full["accumulate"]:
        raise bad_argument("accumulate", f"a divisor of batch={full['batch']}", full["accumulate"])
    return full


def _optimizer(config: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    params, lr = model.parameters(), config["lr"]
    return {"sgd": lambda: torch.optim.SGD(params, lr=lr),
            "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
            "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr),
            "adam": lambda: torch.optim.Adam(params, lr=lr)}[config["optimizer"]]()


def _schedule(config: dict[str, Any], optimizer: torch.optim.Optimizer):
    from gradmedic.remedies import exponential_decay, step_decay, warm_restarts

    steps = config["steps"]
    return {"none": lambda: None,
            "step": lambda: step_decay(optimizer, every=max(1, steps // 3), factor=0.3),
            "exp": lambda: exponential_decay(optimizer, factor=0.01 ** (1.0 / steps)),
            "restarts": lambda: warm_restarts(optimizer, period=max(1, steps // 4))}[config["schedule"]]()


def _loss_fn(task: Task):
    if task.loss == "mse":
        return F.mse_loss

    def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return cross_entropy


def _probes(model: nn.Module, every: int) -> list:
    from gradmedic.probes import ActivationProbe, GradientProbe, TimeStepProbe

    probes = [GradientProbe(every=every, update_ratio=False), ActivationProbe(every=every)]
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        probes.append(TimeStepProbe(every=every))
    return probes


def _weighted_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _WEIGHTED) or isinstance(m, nn.RNNBase)]


def _finite_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _gradient_profile(trace, layers: list[str]) -> dict[str, Any]:
    """Per-layer gradient norms at each recorded step, in forward order, and the first/last ratio."""
    if "grad_norm" not in trace.metrics:
        return {"layers": layers, "steps": [], "grad_norm": []}
    column = {name: j for j, name in enumerate(trace.layers)}
    values = trace.metric("grad_norm")
    picked = values[:, [column[n] for n in layers if n in column]]
    keep = ~np.all(np.isnan(picked), axis=1)
    steps, picked = trace.steps[keep], picked[keep]
    return {"layers": [n for n in layers if n in column], "steps": [int(s) for s in steps],
            "grad_norm": [_finite_list(row) for row in picked]}


def _first_last(norms: list[float | None]) -> float | None:
    valid = [v for v in norms if v is not None]
    if len(valid) < 2 or norms[0] is None or norms[-1] in (None, 0.0):
        return None
    return norms[0] / norms[-1]


def _time_profile(trace) -> dict[str, Any]:
    """dL/dx_t RMS over t at the first and last recorded steps (recurrent models only)."""
    series = trace.series("time_grad_rms") if "time_grad_rms" in trace.series_names else {}
    if not series:
        return {}
    steps, values = next(iter(series.values()))
    init, trained = _finite_list(values[0]), _finite_list(values[-1])
    return {"steps": [int(steps[0]), int(steps[-1])], "init": init, "trained": trained,
            "ratio_init": _first_last(init), "ratio_trained": _first_last(trained)}


def _evaluate(model: nn.Module, task: Task, loss_fn) -> dict[str, float | None]:
    model.eval()
    with torch.no_grad():
        out = model(task.x_test)
        loss = float(loss_fn(out, task.y_test))
        acc = None
        if task.loss == "cross_entropy":
            pred = out.argmax(dim=-1)
            if task.name.startswith("copy"):  # only the ten recall positions carry information
                acc = float((pred[:, -10:] == task.y_test[:, -10:]).float().mean())
            else:
                acc = float((pred == task.y_test).float().mean())
    model.train()
    return {"test_loss": loss if math.isfinite(loss) else None, "test_acc": acc}


def _dead_fraction(trace) -> float | None:
    values = trace.last("dead_frac")
    return float(np.mean(list(values.values()))) if values else None


def run_experiment(config: dict[str, Any]) -> dict[str, Any]:
    """Train one seeded configuration and return its metrics (plain JSON).

    Runs on one intra-op thread (restored afterwards): the reductions of a multi-threaded matmul
    differ in the last bits from run to run and machine to machine, and a deep net's training amplifies
    them, so the same configuration gives the same numbers in a worker, in a test or on another laptop.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: dict[str, Any]) -> dict[str, Any]:
    from gradmedic.monitor import Monitor
    from gradmedic.remedies import AutoClip, accumulate, clip_, recycle_

    config = _validate(config)
    start = time.perf_counter()
    torch.manual_seed(config["seed"])
    task = make_task(config)
    model = _build_model(config, task)
    optimizer = _optimizer(config, model)
    scheduler = _schedule(config, optimizer)
    loss_fn = _loss_fn(task)
    steps, batch, micro = config["steps"], config["batch"], config["accumulate"]
    every = max(1, steps // SNAPSHOTS)
    autoclip = AutoClip() if config["clip"] == "autoclip" else None
    level = config["clip_level"]
    gen = torch.Generator().manual_seed(config["seed"] + 1)
    probe_x = task.x_train[:256]
    target = config["target"] if config["target"] is not None else 0.5 * task.baseline
    losses = torch.full((steps,), float("nan"))
    recycled = 0
    diverged_at = None
    with Monitor(model, optimizer, probes=_probes(model, every), flush_every=min(100, steps)) as monitor:
        for step in range(steps):
            idx = torch.randint(0, len(task.x_train), (batch,), generator=gen)
            x, y = task.x_train[idx], task.y_train[idx]
            if micro > 1:
                loss = accumulate(model, loss_fn, zip(x.chunk(micro), y.chunk(micro), strict=True))
            else:
                loss = loss_fn(model(x), y)
                loss.backward()
            monitor.step(loss)
            if not torch.isfinite(loss):
                diverged_at = step
                break
            if config["clip"] != "none":
                clip_(model.parameters(), config["clip"], max_norm=level, clip_value=level, clip_factor=level,
                      autoclip=autoclip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            losses[step] = loss.detach()
            if config["recycle_every"] and (step + 1) % config["recycle_every"] == 0 and step + 1 < steps:
                recycled += sum(recycle_(model, probe_x, optimizer).values())
    trace = monitor.trace
    curve = losses.numpy()
    done = curve[~np.isnan(curve)]
    window = np.convolve(done, np.ones(10) / 10, mode="valid") if len(done) >= 10 else done
    below = np.flatnonzero(window < target)
    tail = done[-max(1, len(done) // 10):] if len(done) else np.array([np.nan])
    stride = max(1, steps // CURVE_POINTS)
    profile = _gradient_profile(trace, _weighted_layers(model))
    norms = profile["grad_norm"]
    result = {
        "task": task.name, "baseline": task.baseline, "target": target,
        "final_loss": float(tail.mean()) if diverged_at is None else None,
        "best_loss": float(window.min()) if len(window) and diverged_at is None else None,
        "steps_to_target": int(below[0]) + 9 if below.size else None,
        "diverged_at": diverged_at,
        **(_evaluate(model, task, loss_fn) if diverged_at is None else {"test_loss": None, "test_acc": None}),
        "curve": {"steps": list(range(0, steps, stride)), "loss": _finite_list(curve[::stride])},
        "gradients": profile,
        "ratio_init": _first_last(norms[0]) if norms else None,
        "ratio_trained": _first_last(norms[-1]) if norms else None,
        "time": _time_profile(trace),
        "dead_frac": _dead_fraction(trace),
        "recycled_units": recycled,
        "params": sum(p.numel() for p in model.parameters()),
    }
    result["wall_s"] = time.perf_counter() - start
    return result

