"""Seeded CPU training runs that go bad or stay healthy: the evidence corpus of issue 26 (watch a run) and 27
(rescue it).

Each :class:`Run` names its failure class, the finding kind a watcher should report (``None`` for a healthy run)
and its whole recipe (model, data, optimizer and kwargs, lr schedule, clipping, precision, steps, seed), so the
same run can be replayed on a treated copy. ``run(r, on_step=None)`` trains it on one CPU thread and returns a
:class:`Result`: the loss and total gradient norm at every step and the step at which it failed, measured here
by this module's own hooks and arithmetic, never by gradmedic. ``on_step(step, model, optimizer, loss)`` is
called after backward (and after a GradScaler's unscale) and before clipping and ``optimizer.step()``: where a
``monitor.step(loss)`` goes.

How each failure is measured (one detector per failure class; thresholds are the named constants below):

- ``nonfinite``: the first step whose loss is NaN or Inf.
- ``divergence``: the first step of a stretch of ``DIVERGE_HOLD`` steps whose loss all stay above the line
  max(best + ``DIVERGE_LOST`` x (start - best), ``DIVERGE_FACTOR`` x best): the run has given back half of what it
  had learned (a non-finite loss counts as above); a spike that comes back down within the hold is not a failure
  (that is the recovered spike of the healthy runs).
- ``stall``: at step ``STALL_STEPS``, the loss is still above ``STALL_FRACTION`` x where it began (the run never
  learned; its failure step is ``STALL_STEPS`` by definition).
- ``attention_logits``: the first step at which the largest pre-softmax attention logit q.k/sqrt(d_head), computed
  here from forward hooks on the q and k branches (after QK-norm where there is one), exceeds
  ``ATTENTION_LOGIT_FAILURE``.
- ``output_logits``: the first step at which the mean log-partition log Z = logsumexp(logits) of the output head
  (the z-loss quantity) exceeds ``LOG_Z_FAILURE``.
- ``dead_units``: the first probe (every ``DEAD_EVERY`` steps, on a fixed batch) at which more than
  ``DEAD_FAILURE`` of the hidden ReLU units output zero for every sample of it.
- ``gradient_spike``: the first step at which the total gradient norm (before clipping) exceeds
  ``GRAD_SPIKE_FACTOR`` x its median over the previous ``GRAD_SPIKE_WINDOW`` steps.
- ``adam_epsilon``: the first step at which, for the median weight entry, Adam's eps takes more than half of the
  normalised step: sqrt(v_hat) < eps, i.e. sqrt(v_hat) / (sqrt(v_hat) + eps) < ``ADAM_EPS_FAILURE``.
- ``loss_scale``: the first step at which the GradScaler's scale falls below ``LOSS_SCALE_FAILURE``.

float16 on a CPU: the runs marked ``precision="fp16"`` train under ``torch.autocast("cpu", dtype=torch.float16)``
(torch >= 2.x runs CPU linear and matmul in real IEEE float16: outputs and the activation gradients of the
backward are float16 tensors, so their underflow below 6e-8 and overflow above 65504 are the hardware-independent
IEEE behaviour, not an emulation); the weights and their gradients stay float32 as under GPU AMP. bfloat16 is
never used as a stand-in. ``"fp16_scaler"`` adds ``torch.amp.GradScaler("cpu")``.

The failure steps do not depend on the CPU much: over seeds 0-2 and ATen's ``default`` and native (AVX2) kernels
(benchmarks/training_runs_spread.json) the MLP/CNN/RNN runs fail at the same step on both kernels for a seed
(output_logit_drift_mlp: 161 vs 190), the GPT runs move by up to 60 steps (float rounding compounds through an
unstable run), every bad run fails inside its ``window`` and no healthy run fails. AVX-512 was not available to
check. One CPU thread throughout (``run`` sets it), so no result depends on a reduction's thread split.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BAD", "HEALTHY", "RUNS", "Recipe", "Result", "Run", "by_name", "run", "with_seed"]

# --- failure thresholds ---------------------------------------------------------------------------------------
# Divergence: the run has given back more than half of what it had learned (the loss is above best + 0.5 x
# (start - best), start = the mean of its first DIVERGE_START losses) and is above 1.5x its best, for DIVERGE_HOLD
# steps in a row. Scale-free (a run near zero loss is not "diverged" by noise of 1e-3); the healthy runs' batch
# noise and their recovered spikes come back within 5 steps.
DIVERGE_LOST = 0.5
DIVERGE_FACTOR = 1.5
DIVERGE_START = 5
DIVERGE_HOLD = 10
# Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", fig. 1): every
# run whose max attention logit passed 1e4 diverged; the same holds at width 32 here.
ATTENTION_LOGIT_FAILURE = 1e4
# Wortsman et al. 2023: output-logit divergence, log Z drifting away from 0 (what z-loss pins). A mean log Z of
# 40 means logits of ~40 and more: in float16/bfloat16 the spacing there is 1/32 to 1/4, the loss resolution is gone.
LOG_Z_FAILURE = 40.0
DEAD_EVERY = 5  # steps between dead-unit probes (an extra no-grad forward on a fixed batch)
# Lu et al. 2019 ("Dying ReLU and initialization"): dead units never come back. Here ~5% of the hidden units are
# dead on the probe batch at init and the healthy runs stay under 2%; 40% (8x init) is past the point where the hot
# run's loss stops falling. (At 50% the hot run hovers at the threshold and whether it "fails" is a coin toss
# across seeds and CPU kernels.)
DEAD_FAILURE = 0.4
# A sudden explosion: 10x the median norm of the previous 20 steps. Pascanu et al. 2013: when an RNN's recurrence
# crosses a bifurcation (spectral radius past 1) its gradient jumps by an order of magnitude or more; the healthy
# runs here, warmup transients and late weight-decay rises included, stay under 5x (tests/test_training_runs.py).
GRAD_SPIKE_FACTOR = 10.0
GRAD_SPIKE_WINDOW = 20
# Adam's update is m_hat / (sqrt(v_hat) + eps): when sqrt(v_hat) < eps the eps term dominates and Adam turns into
# SGD with lr/eps (Kingma & Ba 2015; Wortsman et al. 2023 sec. 3.4 "AdamW epsilon"). 0.5 = sqrt(v_hat) == eps.
ADAM_EPS_FAILURE = 0.5
# v_hat is one batch's g^2 at step 0 and a short average for a while after: read it from step 20 on.
ADAM_EPS_SETTLE = 20
# A run that never learns: after STALL_STEPS steps its loss (mean of the last 10) is still above 0.9x where it
# began. Every healthy run here has halved its loss by step 100; the post-LN run without warmup sits at chance.
STALL_STEPS = 100
STALL_FRACTION = 0.9
# A loss scale below 1 multiplies the loss down: float16 gradients then underflow sooner than with no scaling at
# all; GradScaler starts at 2**16 and only gets there by 16 overflow halvings in a row of growth intervals.
LOSS_SCALE_FAILURE = 1.0

DIGITS_TRAIN = 1500  # of sklearn's 1797 digits; the rest are the fixed probe batch
COPY_LEN = 8  # copy task: 8 random tokens, a separator, the same 8 again
VOCAB = 16


# --- recipe and run -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How the run trains: everything a replay on a treated copy needs besides the model and the data."""

    optimizer: str = "Adam"  # a torch.optim class name
    lr: float = 1e-3
    optimizer_kwargs: tuple[tuple[str, Any], ...] = ()
    warmup: int = 0  # linear warmup steps from lr/warmup
    schedule: str = "constant"  # "constant" | "cosine" (to 0 at the last step, after warmup)
    lr_spike: tuple[int, int, float] | None = None  # (first step, steps, factor): lr x factor for those steps
    clip: float | None = None  # clip_grad_norm_ max norm
    precision: str = "fp32"  # "fp32" | "fp16" (autocast float16, no scaler) | "fp16_scaler"
    steps: int = 300
    batch_size: int = 64

    def lr_at(self, step: int) -> float:
        lr = self.lr
        if self.warmup and step < self.warmup:
            lr *= (step + 1) / self.warmup
        elif self.schedule == "cosine":
            done = (step - self.warmup) / max(1, self.steps - self.warmup)
            lr *= 0.5 * (1 + math.cos(math.pi * done))
        if self.lr_spike is not None and self.lr_spike[0] <= step < self.lr_spike[0] + self.lr_spike[1]:
            lr *= self.lr_spike[2]
        return lr

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.optimizer)(params, lr=self.lr_at(0), **dict(self.optimizer_kwargs))


@dataclass(frozen=True)
class Run:
    """One seeded training run. ``window``: the steps within which a bad run's failure falls for every seed and CPU
    kernel checked (tests/test_training_runs.py); ``None`` for a healthy run, which must not fail at all."""

    name: str
    klass: str  # the failure class (issue 26), "healthy_..." for a healthy run
    expected_kind: str | None  # what a watcher should name; None: nothing
    model: str  # a key of MODELS
    task: str  # a key of TASKS
    recipe: Recipe
    detectors: tuple[str, ...]  # keys of DETECTORS; the failure step is the first at which one fires
    window: tuple[int, int] | None = None
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0  # model init and batch order
    also: tuple[str, ...] = ()  # other kinds that name this failure fairly
    fault: tuple[int, str] | None = None  # (step, "inf" | "noisy_labels"): a bad batch
    drift: bool = False  # a slow drift: a watcher should warn >= 100 steps ahead of the failure
    note: str = ""

    @property
    def bad(self) -> bool:
        return self.expected_kind is not None


def with_seed(r: Run, seed: int) -> Run:
    return dataclasses.replace(r, seed=seed)


@dataclass
class Result:
    run: Run
    losses: list[float]
    grad_norms: list[float]  # total gradient norm per step, before clipping (after unscaling)
    failure_step: int | None
    failure_by: str | None
    final_loss: float
    peaks: dict[str, float]  # detector -> the largest value of its statistic over threshold (> 1: fired)
    fired: dict[str, int]  # detector -> the failure step it gave, for those that fired
    signals: dict[str, list[float]] = field(default_factory=dict)  # per-step measured values, for plots
    seconds: float = 0.0


# --- data -----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1.0)  # standardised; constant border pixels stay 0
    return x, torch.tensor(data.target, dtype=torch.long)


class Task:
    """Batches drawn from a generator seeded by the run's seed: the same run replays the same batches."""

    loss_kind = "ce"

    def __init__(self, seed: int, batch_size: int):
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.batch_size = batch_size

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def probe(self) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), ignore_index=-100)


class Digits(Task):
    image = False

    def batch(self):
        x, y = _digits()
        idx = torch.randint(0, DIGITS_TRAIN, (self.batch_size,), generator=self.gen)
        xb = x[idx]
        return (xb.view(-1, 1, 8, 8) if self.image else xb), y[idx]

    def probe(self):
        x = _digits()[0][DIGITS_TRAIN:]
        return x.view(-1, 1, 8, 8) if self.image else x


class DigitsImage(Digits):
    image = True


class Copy(Task):
    """Next-token prediction of a copy task: 8 random tokens, a separator, the same 8; only the copy is scored. The
    model must learn to attend back 9 positions, so its attention has to sharpen as it learns."""

    def batch(self):
        body = torch.randint(2, VOCAB, (self.batch_size, COPY_LEN), generator=self.gen)
        seq = torch.cat([body, torch.ones(self.batch_size, 1, dtype=torch.long), body], 1)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :COPY_LEN] = -100
        return x, y

    def probe(self):
        return self.batch()[0]


class Recall(Task):
    """Remember the first of 30 random values and output it at the end: the recurrence has to keep a direction
    alive for 30 steps, which pulls its spectral radius up toward (and past) 1."""

    loss_kind = "mse"
    length = 30

    def batch(self):
        values = torch.randn(self.batch_size, self.length, 1, generator=self.gen)
        marks = torch.zeros_like(values)
        marks[:, 0] = 1.0
        return torch.cat([values, marks], -1), values[:, 0]

    def probe(self):
        return self.batch()[0]

    def loss(self, out, y):
        return F.mse_loss(out.float(), y)


TASKS: dict[str, type[Task]] = {"digits": Digits, "digits_image": DigitsImage, "copy": Copy, "recall": Recall}


# --- models ---------------------------------------------------------------------------------------------------
def mlp(width: int = 64, depth: int = 3, act: str = "relu", norm: bool = False, d_in: int = 64,
        d_out: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(d_in if i == 0 else width, width))
        if norm:
            layers.append(nn.LayerNorm(width))
        layers.append({"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[act]())
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))


class Attention(nn.Module):
    """Causal self-attention with the logits materialised (q_norm/k_norm are Identity without QK-norm, so hooks
    on them see exactly the q and k the logits are made of)."""

    def __init__(self, d: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.q_norm = nn.LayerNorm(self.dh) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.dh) if qk_norm else nn.Identity()

    def forward(self, x):
        b, t, d = x.shape
        q = self.q_norm(self.q(x).view(b, t, self.heads, self.dh).transpose(1, 2))
        k = self.k_norm(self.k(x).view(b, t, self.heads, self.dh).transpose(1, 2))
        v = self.v(x).view(b, t, self.heads, self.dh).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool, post_ln: bool):
        super().__init__()
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        if self.post_ln:  # the original Transformer's (Vaswani et al. 2017) placement
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2, heads: int = 2, qk_norm: bool = False, post_ln: bool = False,
                 seq: int = 2 * COPY_LEN):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, qk_norm, post_ln) for _ in range(layers))
        self.ln_f = nn.Identity() if post_ln else nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class RNN(nn.Module):
    def __init__(self, hidden: int = 32, radius: float = 0.9):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity="tanh")
        with torch.no_grad():  # an orthogonal recurrence scaled to the spectral radius asked for
            self.rnn.weight_hh_l0.copy_(radius * torch.linalg.qr(torch.randn(hidden, hidden))[0])
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "gpt": GPT, "rnn": RNN}


def build(r: Run) -> tuple[nn.Module, Task]:
    torch.manual_seed(r.seed)
    model = MODELS[r.model](**dict(r.model_kwargs))
    return model, TASKS[r.task](r.seed, r.recipe.batch_size)


# --- measurement: this module's own hooks, on the model and on a hook-free shadow copy ---------------------------
class Signals:
    """The per-step numbers the detectors read, measured without gradmedic. The dead-unit probe's extra forward runs
    on a shadow copy of the model that carries no hooks, so a Monitor on the model never sees it."""

    def __init__(self, r: Run, model: nn.Module, task: Task, needs: set[str]):
        self.r, self.model, self.task, self.needs = r, model, task, needs
        self.values: dict[str, float] = {}
        self._handles = []
        self._shadow: nn.Module | None = None
        if "attention_logit" in needs:
            for attn in (m for m in model.modules() if isinstance(m, Attention)):
                self._hook_attention(attn)
        if "log_z" in needs:
            self._handles.append(model.register_forward_hook(self._on_output))

    def _hook_attention(self, attn: Attention) -> None:
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(_module, _inputs, output):
                seen[name] = output.detach()
            return hook

        def logits(_module, _inputs, _output):
            q, k = seen.pop("q").float(), seen.pop("k").float()
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            t = scores.shape[-1]
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            top = float(scores.masked_fill(~causal, float("-inf")).amax())
            self.values["attention_logit"] = max(self.values.get("attention_logit", float("-inf")), top)

        self._handles += [attn.q_norm.register_forward_hook(keep("q")), attn.k_norm.register_forward_hook(keep("k")),
                          attn.register_forward_hook(logits)]

    def _on_output(self, _module, _inputs, output):
        self.values["log_z"] = float(torch.logsumexp(output.detach().float(), -1).mean())

    def shadow(self) -> nn.Module:
        if self._shadow is None:
            with torch.random.fork_rng():  # its init is overwritten below: it must not move the caller's RNG
                self._shadow = MODELS[self.r.model](**dict(self.r.model_kwargs))
        self._shadow.load_state_dict(self.model.state_dict())
        return self._shadow

    def dead_share(self) -> float:
        shadow = self.shadow()
        alive: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: alive.append((out > 0).any(0).flatten()))
                   for m in shadow.modules() if isinstance(m, nn.ReLU)]
        with torch.no_grad():
            shadow(self.task.probe())
        for h in handles:
            h.remove()
        return float((~torch.cat(alive)).float().mean()) if alive else 0.0

    @staticmethod
    def adam_eps_fraction(optimizer: torch.optim.Optimizer) -> float:
        """Median over weight entries of sqrt(v_hat) / (sqrt(v_hat) + eps): 1 when eps is negligible."""
        parts = []
        for group in optimizer.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if p.ndim < 2 or not state or "exp_avg_sq" not in state:
                    continue
                t = float(state["step"])
                s = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt().flatten()
                s = s[s > 0]  # never had a gradient (the digits' constant border pixels): no update to take
                parts.append(s / (s + eps))
        return float(torch.cat(parts).median()) if parts else 1.0

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# --- detectors ------------------------------------------------------------------------------------------------
class Detector:
    """Reads one signal per step; ``update`` returns the failure step once (it can be earlier than ``step``: a
    divergence is dated to the start of the stretch that held). ``peak``: the largest statistic/threshold seen."""

    signal = "loss"

    def __init__(self):
        self.peak = 0.0

    def update(self, step: int, value: float) -> int | None:
        raise NotImplementedError


class Nonfinite(Detector):
    def update(self, step, value):
        if not math.isfinite(value):
            self.peak = 1.0
            return step
        return None


class Divergence(Detector):
    def __init__(self):
        super().__init__()
        self.best = math.inf
        self.first: list[float] = []
        self.ratios: list[float] = []  # (loss - best) / the allowed rise; > 1 is above the line

    def update(self, step, value):
        finite = math.isfinite(value)
        if finite and len(self.first) < DIVERGE_START:
            self.first.append(value)
        if finite:
            self.best = min(self.best, value)
        start = float(np.mean(self.first)) if self.first else math.inf
        line = max(self.best + DIVERGE_LOST * (start - self.best), DIVERGE_FACTOR * self.best)
        self.ratios.append(value / line if finite and line > 0 else math.inf)
        held = min(self.ratios[-DIVERGE_HOLD:]) if len(self.ratios) >= DIVERGE_HOLD else 0.0
        self.peak = max(self.peak, held)
        if held > 1.0:
            return step - DIVERGE_HOLD + 1
        return None


class Stall(Detector):
    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def update(self, step, value):
        self.losses.append(value if math.isfinite(value) else math.inf)
        if step != STALL_STEPS:
            return None
        ratio = float(np.mean(self.losses[-10:])) / float(np.mean(self.losses[:DIVERGE_START]))
        self.peak = ratio / STALL_FRACTION
        return step if ratio > STALL_FRACTION else None


class Above(Detector):
    """Fires when the signal exceeds a fixed threshold (or is not finite)."""

    threshold = 0.0

    def update(self, step, value):
        if math.isnan(value):
            return None  # not measured at this step
        self.peak = max(self.peak, value / self.threshold if math.isfinite(value) else math.inf)
        return step if not math.isfinite(value) or value > self.threshold else None


class AttentionLogits(Above):
    signal, threshold = "attention_logit", ATTENTION_LOGIT_FAILURE


class OutputLogits(Above):
    signal, threshold = "log_z", LOG_Z_FAILURE


class DeadUnits(Above):
    signal, threshold = "dead_share", DEAD_FAILURE


class Below(Detector):
    threshold = 1.0

    def update(self, step, value):
        if math.isnan(value):
            return None
        self.peak = max(self.peak, self.threshold / value if value > 0 else math.inf)
        return step if value < self.threshold else None


class AdamEpsilon(Below):
    signal, threshold = "adam_eps_fraction", ADAM_EPS_FAILURE

    def update(self, step, value):
        return super().update(step, value) if step >= ADAM_EPS_SETTLE else None


class LossScale(Below):
    signal, threshold = "loss_scale", LOSS_SCALE_FAILURE


class GradientSpike(Detector):
    signal = "grad_norm"

    def __init__(self):
        super().__init__()
        self.history: list[float] = []

    def update(self, step, value):
        recent = self.history[-GRAD_SPIKE_WINDOW:]
        fired = None
        if len(recent) >= GRAD_SPIKE_WINDOW // 2:
            median = float(np.median(recent))
            self.peak = max(self.peak, value / median / GRAD_SPIKE_FACTOR if math.isfinite(value) else math.inf)
            if not math.isfinite(value) or value > GRAD_SPIKE_FACTOR * median:
                fired = step
        if math.isfinite(value):
            self.history.append(value)
        return fired


DETECTORS: dict[str, type[Detector]] = {
    "nonfinite": Nonfinite, "divergence": Divergence, "attention_logits": AttentionLogits,
    "output_logits": OutputLogits, "dead_units": DeadUnits, "gradient_spike": GradientSpike,
    "adam_epsilon": AdamEpsilon, "loss_scale": LossScale, "stall": Stall,
}


# --- the training loop ----------------------------------------------------------------------------------------
OnStep = Callable[[int, nn.Module, torch.optim.Optimizer, torch.Tensor], None]


def run(r: Run, on_step: OnStep | None = None, *, steps: int | None = None,
        model: nn.Module | None = None) -> Result:
    """Train ``r`` from its seed on one CPU thread. ``model``: train this one instead of building it (a treated
    copy); ``steps``: stop earlier than the recipe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(r, on_step, steps, model)
    finally:
        torch.set_num_threads(threads)


def _corrupt(r: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, what = r.fault  # type: ignore[misc]
    if what == "inf":  # one feature of one sample is inf: a division by a zero std in someone's preprocessing
        x = x.clone()
        x.view(x.shape[0], -1)[0, 0] = float("inf")
    elif what == "noisy_labels":  # a batch whose labels were shuffled: a large but honest loss
        y = (y + 1 + torch.arange(y.shape[0]) % 9) % 10
    return x, y


def _train(r: Run, on_step: OnStep | None, steps: int | None, given: nn.Module | None) -> Result:
    start = time.perf_counter()
    model, task = build(r)
    if given is not None:
        model = given
    rec = r.recipe
    optimizer = rec.make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu") if rec.precision == "fp16_scaler" else None
    fp16 = rec.precision != "fp32"
    detectors = {name: DETECTORS[name]() for name in r.detectors}
    needs = {d.signal for d in detectors.values()}
    signals = Signals(r, model, task, needs)
    series: dict[str, list[float]] = {name: [] for name in needs if name not in ("loss", "grad_norm")}
    losses: list[float] = []
    grad_norms: list[float] = []
    failure_step: int | None = None
    failure_by: str | None = None
    first: dict[str, int] = {}
    for step in range(rec.steps if steps is None else steps):
        for group in optimizer.param_groups:
            group["lr"] = rec.lr_at(step)
        x, y = task.batch()
        if r.fault is not None and step == r.fault[0]:
            x, y = _corrupt(r, x, y)
        optimizer.zero_grad(set_to_none=True)
        signals.values = {}
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = task.loss(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        values = dict(signals.values, loss=float(loss.detach()), grad_norm=grad_norm)
        if on_step is not None:
            on_step(step, model, optimizer, loss)
        if rec.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), rec.clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            values["loss_scale"] = float(scaler.get_scale())
        else:
            optimizer.step()
        if "adam_eps_fraction" in needs:
            values["adam_eps_fraction"] = signals.adam_eps_fraction(optimizer)
        if "dead_share" in needs:
            values["dead_share"] = signals.dead_share() if step % DEAD_EVERY == 0 else math.nan
        losses.append(values["loss"])
        grad_norms.append(grad_norm)
        for name in series:
            series[name].append(values.get(name, math.nan))
        for name, detector in detectors.items():
            fired = detector.update(step, values.get(detector.signal, math.nan))
            if fired is not None and name not in first:
                first[name] = fired
                if failure_step is None or fired < failure_step:
                    failure_step, failure_by = fired, name
    signals.close()
    return Result(r, losses, grad_norms, failure_step, failure_by, losses[-1],
                  {name: d.peak for name, d in detectors.items()}, first, series, time.perf_counter() - start)


# --- the corpus -----------------------------------------------------------------------------------------------
ALWAYS = ("nonfinite", "divergence")  # every run is also watched for these


def _kw(**kwargs) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())


def bad(name: str, klass: str, kind: str, model: str, task: str, recipe: Recipe, detector: str | tuple[str, ...] | None,
        window: tuple[int, int], **extra) -> Run:
    extra_detectors = (detector,) if isinstance(detector, str) else (detector or ())
    detectors = ALWAYS + tuple(d for d in extra_detectors if d not in ALWAYS)
    return Run(name, klass, kind, model, task, recipe, detectors, window, **extra)


def healthy(name: str, model: str, task: str, recipe: Recipe, detector: str | None = None, **extra) -> Run:
    detectors = ALWAYS + ((detector,) if detector and detector not in ALWAYS else ())
    return Run(name, "healthy_" + name.removeprefix("healthy_"), None, model, task, recipe, detectors, None,
               **extra)


# Adam warmed up over 300 steps to lr 0.1: the copy task is learned by step ~60 at a low lr, then the attention logits
# grow with the lr (x2 per ~30 steps) until the loss goes back to chance.
GPT_HOT = Recipe(optimizer="Adam", lr=1e-1, warmup=300, steps=340, batch_size=16)
SGD_MOMENTUM = _kw(momentum=0.9)

RUNS: tuple[Run, ...] = (
    # --- bad ---------------------------------------------------------------------------------------------------
    bad("high_lr_no_warmup_cnn", "high_lr_no_warmup", "divergence", "cnn", "digits_image",
        Recipe(optimizer="SGD", lr=0.5, optimizer_kwargs=SGD_MOMENTUM, steps=60), "gradient_spike", (10, 40),
        also=("loss_spike", "update_too_large", "exploding_gradients")),
    bad("high_lr_no_warmup_mlp", "high_lr_no_warmup", "divergence", "mlp", "digits",
        Recipe(optimizer="SGD", lr=3.0, optimizer_kwargs=SGD_MOMENTUM, steps=40), "gradient_spike", (0, 10),
        model_kwargs=_kw(act="tanh"), also=("loss_spike", "update_too_large", "exploding_gradients")),
    bad("attention_logit_growth_gpt", "attention_logit_growth", "attention_logit_growth", "gpt", "copy", GPT_HOT,
        "attention_logits", (200, 330), also=("divergence",), drift=True),
    bad("post_ln_no_warmup_gpt", "post_ln_no_warmup", "loss_stall", "gpt", "copy",
        Recipe(optimizer="Adam", lr=3e-2, steps=120, batch_size=16), "stall", (STALL_STEPS, STALL_STEPS),
        model_kwargs=_kw(post_ln=True, layers=4), also=("vanishing_gradients", "update_too_large", "divergence"),
        note="never leaves chance (ln 14); the failure step is STALL_STEPS by the stall definition"),
    bad("dying_units_hot_lr_mlp", "dying_units_hot_lr", "dead_units", "mlp", "digits",
        Recipe(optimizer="SGD", lr=2.5, steps=160), "dead_units", (10, 120), model_kwargs=_kw(depth=4)),
    bad("explosive_recurrence_rnn", "explosive_recurrence", "exploding_gradients", "rnn", "recall",
        Recipe(optimizer="SGD", lr=0.05, steps=150), ("gradient_spike", "stall"), (50, 120),
        also=("exploding_through_time",), note="the spectral radius of W_hh passes 1 near step 70; the norm jumps 20x "
        "and stays 5-10x above where it was, with spikes, never non-finite; the loss never leaves the target's "
        "variance (stall at step 100). healthy_rnn_adam's norm jumps too (x16, step 34) while it learns: a jump alone "
        "is not the failure"),
    bad("fp16_no_loss_scaling_gpt", "fp16_no_loss_scaling", "divergence", "gpt", "copy",
        dataclasses.replace(GPT_HOT, precision="fp16", steps=340), None, (200, 340),
        also=("attention_logit_growth", "nonfinite", "gradient_underflow"), drift=True,
        note="GPT_HOT under float16 autocast without a GradScaler: it diverges ~70 steps later than in float32 and "
        "goes no further (no NaN within 330 steps). Honest limit: a float16-specific failure (underflow) was not "
        "reproduced at this size: under 5% of gradient entries flush to zero even on a small-unit regression"),
    bad("loss_scale_collapse_gpt", "fp16_no_loss_scaling", "loss_scale_collapse", "gpt", "copy",
        dataclasses.replace(GPT_HOT, precision="fp16_scaler", steps=360), "loss_scale", (200, 360),
        also=("attention_logit_growth", "nonfinite", "divergence"), drift=True,
        note="the same overflow under GradScaler: every step is skipped and the scale halves to 0"),
    bad("lr_spike_no_clipping_mlp", "lr_spike_no_clipping", "loss_spike", "mlp", "digits",
        Recipe(optimizer="SGD", lr=0.05, optimizer_kwargs=SGD_MOMENTUM, lr_spike=(150, 5, 50.0), steps=200),
        None, (150, 160), also=("divergence", "update_too_large", "nonfinite"),
        note="lr x50 for steps 150-154 (a scheduler restart gone wrong); the loss does not come back"),
    bad("nan_from_data_mlp", "nan_from_data", "nonfinite", "mlp", "digits", Recipe(steps=60), None, (40, 40),
        fault=(40, "inf")),
    bad("output_logit_drift_mlp", "output_logit_drift", "output_logit_drift", "mlp", "digits",
        Recipe(optimizer="Adam", lr=4e-2, steps=260), "output_logits", (80, 250), model_kwargs=_kw(act="gelu"),
        drift=True),
    bad("adam_epsilon_mlp", "adam_epsilon", "adam_epsilon", "mlp", "digits",
        Recipe(optimizer="Adam", lr=3e-3, optimizer_kwargs=_kw(eps=1.8e-3), steps=450), "adam_epsilon", (150, 440),
        model_kwargs=_kw(act="tanh"), also=("stalled_updates",), drift=True),
    # --- healthy, as practitioners set them up ------------------------------------------------------------------
    healthy("healthy_mlp_adam", "mlp", "digits", Recipe(optimizer="Adam", lr=1e-3, steps=300), "dead_units"),
    healthy("healthy_mlp_sgd_cosine", "mlp", "digits",
            Recipe(optimizer="SGD", lr=0.05, optimizer_kwargs=SGD_MOMENTUM, schedule="cosine", steps=300),
            "gradient_spike", note="the gradient norm falls as the loss falls"),
    healthy("healthy_cnn_adam_warmup", "cnn", "digits_image", Recipe(optimizer="Adam", lr=1e-3, warmup=30, steps=200),
            "gradient_spike"),
    healthy("healthy_gpt_warmup_clip", "gpt", "copy",
            Recipe(optimizer="AdamW", lr=3e-3, optimizer_kwargs=_kw(weight_decay=0.1), warmup=50, schedule="cosine",
                   clip=1.0, steps=250, batch_size=16), "attention_logits"),
    healthy("healthy_gpt_qk_norm_hot", "gpt", "copy", GPT_HOT, "attention_logits", model_kwargs=_kw(qk_norm=True),
            note="attention_logit_growth_gpt's recipe with QK-norm"),
    healthy("healthy_post_ln_warmup", "gpt", "copy",
            Recipe(optimizer="Adam", lr=3e-3, warmup=100, steps=200, batch_size=16), "stall",
            model_kwargs=_kw(post_ln=True, layers=4)),
    healthy("healthy_rnn_adam", "rnn", "recall", Recipe(optimizer="Adam", lr=3e-3, steps=250), "stall",
            note="its radius passes 1 and its gradient norm jumps x16 at step 34 as it learns to remember: benign"),
    healthy("healthy_weight_decay_late_rise", "mlp", "digits",
            Recipe(optimizer="AdamW", lr=3e-3, optimizer_kwargs=_kw(weight_decay=0.1), schedule="cosine", steps=400),
            None, model_kwargs=_kw(norm=True),
            note="Defazio 2025: with weight decay and normalisation the gradient norm rises as the lr decays; near "
            "zero loss single batches give 27x the rolling median norm (step ~169): benign"),
    healthy("healthy_recovered_spike", "mlp", "digits", Recipe(optimizer="Adam", lr=1e-3, steps=250), None,
            fault=(150, "noisy_labels"), note="one batch with wrong labels at step 150: the loss jumps and recovers"),
    healthy("healthy_fp16_grad_scaler", "mlp", "digits",
            Recipe(optimizer="Adam", lr=1e-3, precision="fp16_scaler", steps=200), "loss_scale"),
    healthy("healthy_adam_eps_default", "mlp", "digits", Recipe(optimizer="Adam", lr=3e-3, steps=450),
            "adam_epsilon", model_kwargs=_kw(act="tanh"), note="adam_epsilon_mlp with eps=1e-8"),
    healthy("healthy_adamw_logits", "mlp", "digits",
            Recipe(optimizer="AdamW", lr=1e-2, optimizer_kwargs=_kw(weight_decay=0.1), warmup=20, schedule="cosine",
                   steps=260), "output_logits", model_kwargs=_kw(act="gelu")),
)
BAD = tuple(r for r in RUNS if r.bad)
HEALTHY = tuple(r for r in RUNS if not r.bad)


def by_name(name: str) -> Run:
    return next(r for r in RUNS if r.name == name)


def watched(name: str, monitors: list | None = None, **monitor_kwargs):
    """One corpus run under a default-preset Monitor made at its first step (the model and optimizer exist only inside
    ``run``): (the run's result, the closed Monitor's trace). ``monitors``: the Monitor is appended to it (a test that
    reads more than the trace); ``monitor_kwargs`` go to the Monitor."""
    import gradmedic as gm

    holder = {}

    def on_step(step, model, optimizer, loss):
        if "monitor" not in holder:
            holder["monitor"] = gm.Monitor(model, optimizer, **monitor_kwargs)
        holder["monitor"].step(loss)

    result = run(by_name(name), on_step)
    holder["monitor"].close()
    if monitors is not None:
        monitors.append(holder["monitor"])
    return result, holder["monitor"].trace
