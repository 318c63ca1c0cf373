"""One lab run: a plain-JSON configuration in, a plain-JSON result out, the same on every call.

A configuration names a task, a model family with its spec fields, an optimizer and the remedies of the
training loop (clipping, recycling dead units, gradient accumulation, a learning-rate schedule). The
run is watched by a ``Monitor`` so that its per-layer gradient ratios (at init and as training goes)
come from the same probes a user gets, not from a second measuring path.

Keys (defaults in ``DEFAULTS``): ``task`` (digits | digits_image | pixel_digits | row_digits |
permuted_digits | adding | copy | recall), ``length`` (adding/copy: T; recall: key-value pairs), ``model``
(mlp | cnn | rnn | transformer), ``spec`` (fields of MLPSpec / CNNSpec / RNNSpec / TransformerSpec),
``optimizer`` (sgd | momentum | rmsprop | adam), ``lr``, ``schedule`` (none | step | exp | restarts),
``warmup`` (steps of linear learning-rate warmup; 0 = none), ``steps``, ``batch``, ``accumulate``
(micro-batches per step), ``clip`` (none | value | norm | autoclip | agc), ``recycle_every`` (steps; 0 =
never), ``redraw_patience`` (re-draw all parameters from the run's init, with a fresh seed, after this many
consecutive steps whose gradient has vanished; 0 = never), ``fused`` (PyTorch's fused step for SGD and Adam, one
kernel over all parameters: the per-tensor loop took a third of a 1000-block transformer's step), ``jacobian``
(MLP/CNN: record the singular values of the blocks' input-output Jacobian at init), ``target`` (a training loss:
``steps_to_target`` is the first step whose 10-step mean is below it; default half the task's baseline), ``seed``.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import jacrev, vmap
from torch.nn import functional as F

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic.lab.models import CNNSpec, MLPSpec, RNNSpec, build_cnn, build_mlp, build_rnn
from gradmedic.lab.tasks import Task, adding, copy_task, digits, recall, sequential_digits
from gradmedic.lab.transformer import StreamRecord, TransformerSpec, build_transformer
from gradmedic.monitor import Monitor
from gradmedic.probes import ActivationProbe, GradientProbe, TimeStepProbe
from gradmedic.remedies import AutoClip, accumulate, clip_, exponential_decay, recycle_, step_decay, warm_restarts

__all__ = ["DEFAULTS", "machine", "make_task", "run_experiment"]

DEFAULTS: dict[str, Any] = {
    "task": "digits", "length": 0, "model": "mlp", "spec": {}, "optimizer": "adam", "lr": 1e-3,
    "schedule": "none", "steps": 200, "batch": 64, "accumulate": 1, "clip": "none", "clip_level": 1.0,
    "recycle_every": 0, "target": None, "seed": 0, "warmup": 0, "redraw_patience": 0, "jacobian": False,
    "fused": False,
}
TASKS = ("digits", "digits_image", "pixel_digits", "row_digits", "permuted_digits", "adding", "copy", "recall")
MODELS = ("mlp", "cnn", "rnn", "transformer")
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SCHEDULES = ("none", "step", "exp", "restarts")
CLIPS = ("none", "value", "norm", "autoclip", "agc")
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
CURVE_POINTS = 60  # the loss curve is kept at about this many points
SNAPSHOTS = 8  # per-layer gradient norms are recorded at about this many steps
# "the gradient has vanished" for redraw_patience: the first weighted layer's gradient norm is below this
# fraction of the last layer's. A healthy deep net sits near 1e-1..1e1 (He init measured 0.6-1.3 at depth
# 30); a dead ReLU net gives exactly 0 and a 20-layer sigmoid net ~1e-17, so 1e-6 separates them by decades.
VANISHED_RATIO = 1e-6
MAX_REDRAWS = 10  # a run re-draws its parameters at most this many times
JACOBIAN_INPUTS = 8  # training inputs at which the Jacobian's singular values are taken (medians reported)


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
    if name == "recall":
        return recall(length or 4, seed=seed)
    return copy_task(length, seed=seed)


def _build_model(config: dict[str, Any], task: Task, seed: int | None = None) -> nn.Module:
    family, seed = config["model"], config["seed"] if seed is None else seed
    spec_cls, build = {"mlp": (MLPSpec, build_mlp), "cnn": (CNNSpec, build_cnn), "rnn": (RNNSpec, build_rnn),
                       "transformer": (TransformerSpec, build_transformer)}[family]
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
    elif family == "transformer":
        if task.x_train.dtype != torch.long:
            raise bad_argument("task", "a token task (recall) for model 'transformer'", task.name)
        spec.setdefault("vocab", int(max(task.x_train.max(), task.x_test.max())) + 1)
        spec.setdefault("max_len", task.x_train.shape[1])
    return build(spec_cls(**spec), seed=seed)


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration with its defaults filled in; a GradmedicError names what is wrong."""
    if not isinstance(config, dict):
        raise GradmedicError(f"A lab configuration should be a dict, but given {type(config).__name__}.")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise bad_argument("config", f"keys among {sorted(DEFAULTS)}", unknown)
    full = {**DEFAULTS, **config}
    for key, allowed in (("task", TASKS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("clip", CLIPS),
                         ("model", MODELS), ("fused", (False, True))):
        if full[key] not in allowed:
            raise bad_argument(key, f"one of {allowed}", full[key])
    for key in ("steps", "batch", "accumulate"):
        if not isinstance(full[key], int) or full[key] < 1:
            raise bad_argument(key, "a positive int", full[key])
    for key in ("warmup", "redraw_patience"):
        if not isinstance(full[key], int) or isinstance(full[key], bool) or full[key] < 0:
            raise bad_argument(key, "an int >= 0", full[key])
    if full["warmup"] and full["schedule"] != "none":
        raise bad_argument("warmup", f"0 with schedule={full['schedule']!r} (warmup goes with schedule 'none')",
                           full["warmup"])
    if full["jacobian"] and full["model"] != "mlp":
        raise bad_argument("jacobian", "False unless model is 'mlp'", full["jacobian"])
    if full["batch"] % full["accumulate"]:
        raise bad_argument("accumulate", f"a divisor of batch={full['batch']}", full["accumulate"])
    return full


def _optimizer(config: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    params, lr, fused = model.parameters(), config["lr"], {"fused": True} if config["fused"] else {}
    return {"sgd": lambda: torch.optim.SGD(params, lr=lr, **fused),
            "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, **fused),
            "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr),
            "adam": lambda: torch.optim.Adam(params, lr=lr, **fused)}[config["optimizer"]]()


def _schedule(config: dict[str, Any], optimizer: torch.optim.Optimizer):
    steps, warmup = config["steps"], config["warmup"]
    if warmup:  # linear from lr / warmup to lr over the first `warmup` steps, then constant
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
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


def _jacobian_spectrum(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Singular values of d(blocks' output)/d(blocks' input) at ``x``'s rows: the input-output Jacobian of
    the same-width part of the net, whose spread is what dynamical isometry (Saxe et al. 2014; Pennington
    et al. 2017) is about. Medians over the rows of the condition number and of the std of log10(sigma)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = model.stem(x)
        jac = vmap(jacrev(lambda row: model.body(row.unsqueeze(0)).squeeze(0)))(h)  # (n, width, width)
        sv = torch.linalg.svdvals(jac.detach().double())  # descending, per row
    finally:
        model.train(was_training)
    cond = sv[:, 0] / sv[:, -1].clamp_min(1e-300)
    spread = sv.clamp_min(1e-300).log10().std(dim=1)
    return {"cond": float(cond.median()), "log10_spread": float(spread.median()),
            "sv_max": float(sv[:, 0].median()), "sv_min": float(sv[:, -1].median()),
            "sv": [float(v) for v in sv[0]]}


def _global_grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def _vanished(model: nn.Module) -> bool:
    """The first weighted layer's gradient norm is below VANISHED_RATIO times the last one's (or both are 0)."""
    layers = [m for m in model.modules() if isinstance(m, _WEIGHTED)]
    norms = []
    for layer in (layers[0], layers[-1]):
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        norms.append(float(torch.cat([g.flatten() for g in grads]).norm()) if grads else 0.0)
    return norms[0] <= VANISHED_RATIO * norms[1]


def _redraw(model: nn.Module, config: dict[str, Any], task: Task, optimizer: torch.optim.Optimizer, n: int) -> None:
    """Re-draw every parameter from the run's own init with a fresh seed, in place (the Monitor's hooks stay),
    and forget the optimizer's state: the "restart learning" remedy, as the seeds' documents state it."""
    fresh = _build_model(config, task, seed=config["seed"] + 7919 * n)
    with torch.no_grad():
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            p.copy_(q)
        for b, c in zip(model.buffers(), fresh.buffers(), strict=True):
            b.copy_(c)
    optimizer.state.clear()


def _saturated_at_init(trace) -> float | None:
    """Mean share of saturated sigmoid/tanh outputs over the activation layers at the first measured step."""
    if "saturated_frac" not in trace.metrics:
        return None
    column = trace.metric("saturated_frac")
    rows = np.flatnonzero(~np.all(np.isnan(column), axis=1))
    return float(np.nanmean(column[rows[0]])) if rows.size else None


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
    redraws, streak, redraw_steps = 0, 0, []
    max_grad_norm: float | None = None  # the largest global gradient norm of a step, before any clipping
    diverged_at = None
    jacobian = _jacobian_spectrum(model, task.x_train[:JACOBIAN_INPUTS]) if config["jacobian"] else None
    stream = StreamRecord(model, probe_x) if config["model"] == "transformer" else None  # before training
    probes = _probes(model, every) + (stream.probes(every) if stream else [])
    with Monitor(model, optimizer, probes=probes, flush_every=min(100, steps),
                 live=False) as monitor:  # the lab stores each run's diagnosis; live lines would cut its progress
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
            grad_norm = _global_grad_norm(model)
            max_grad_norm = grad_norm if max_grad_norm is None or not grad_norm <= max_grad_norm else max_grad_norm
            if config["redraw_patience"] and redraws < MAX_REDRAWS:
                streak = streak + 1 if _vanished(model) else 0
                if streak >= config["redraw_patience"]:
                    redraws, streak = redraws + 1, 0
                    redraw_steps.append(step)
                    _redraw(model, config, task, optimizer, redraws)
                    optimizer.zero_grad(set_to_none=True)
                    losses[step] = loss.detach()
                    continue
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
        "saturated_init": _saturated_at_init(trace),
        "recycled_units": recycled,
        "redraws": redraw_steps,
        "max_grad_norm": max_grad_norm if max_grad_norm is None or math.isfinite(max_grad_norm) else None,
        "jacobian": jacobian, "stream": stream.result(trace) if stream else None,
        "params": sum(p.numel() for p in model.parameters()),
    }
    result["wall_s"] = time.perf_counter() - start
    result["machine"] = machine()
    return result


def machine() -> dict[str, str]:
    """Where a run ran: the platform, PyTorch's CPU kernel capability (ATEN_CPU_CAPABILITY picks it; the
    kernels differ in their last bits, which deep nets amplify) and the torch version."""
    return {"platform": f"{platform.system()} {platform.machine()}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}

