"""The lab's tasks: small, seeded, no downloads. Each states the loss of the best input-blind predictor.

- ``digits``: scikit-learn's 8x8 digits (1797 images, bundled with the package), pixels scaled to [0, 1],
  a stratified seeded split. Baseline: the cross-entropy of predicting the class frequencies (~ln 10).
- ``sequential_digits``: the same images read as a sequence, pixel by pixel (64 steps of 1) or row by row
  (8 steps of 8), optionally under a fixed random permutation of the pixels (the "permuted" variant, which
  spreads the informative pixels over the whole sequence).
- ``adding``: Hochreiter & Schmidhuber (1997); Le et al. (2015). Input (T, 2): a value ~ U[0, 1] and a
  mask with exactly two ones, one in each half; target the sum of the two marked values. Predicting the
  mean, 1, gives MSE = Var(U1 + U2) = 2/12 = 1/6.
- ``copy_task``: Arjovsky et al. (2016). Ten symbols from 1-8, T-1 blanks, a delimiter (9), ten blanks; the
  target is blanks until the delimiter's ten blanks, then the ten symbols. A memoryless predictor that
  outputs blank and then a uniform guess over 8 symbols scores 10 ln 8 / (T + 20) per step.
- ``recall``: associative recall (Ba et al. 2016; Zoology, Arora et al. 2023), a token task for the
  Transformer LM. ``pairs`` distinct keys from 16, each followed by its value from 16, then one of the keys
  again: the target is its value. Only the context says which value, so the input-blind baseline is ln 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradmedic._errors import GradmedicError, bad_argument

__all__ = ["COPY_SYMBOLS", "RECALL_KEYS", "Task", "adding", "copy_task", "digits", "recall", "sequential_digits"]

COPY_SYMBOLS = 8  # symbols 1..8; 0 is the blank, 9 the delimiter
_COPY_LENGTH = 10
RECALL_KEYS = 16  # keys are tokens 0..15, values 16..31 (the target class is value - 16)


@dataclass(frozen=True)
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    loss: str  # "cross_entropy" (targets are class indices) or "mse"
    baseline: float  # the loss of the best predictor that ignores the input
    classes: int | None = None  # for cross-entropy: the number of output classes

    def __repr__(self) -> str:
        return (f"Task({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"loss={self.loss}, baseline={self.baseline:.4f})")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad_argument(name, "a positive int", value)


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits  # optional: the lab extra
    except ImportError as error:
        raise GradmedicError("The digits tasks need scikit-learn (its digits ship inside it): "
                             "pip install 'gradmedic[lab]'") from error
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64), pixels 0..16 -> [0, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(y):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = round(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _prior_cross_entropy(y: torch.Tensor, classes: int) -> float:
    """Cross-entropy on ``y`` of predicting the class frequencies of ``y``."""
    p = torch.bincount(y, minlength=classes).double() / len(y)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def digits(seed: int = 0, test_fraction: float = 0.25) -> Task:
    """8x8 digits as 64-dim vectors."""
    if not 0 < test_fraction < 1:
        raise bad_argument("test_fraction", "a float in (0, 1)", test_fraction)
    x, y = _load_digits()
    train, test = _stratified_split(y, test_fraction, seed)
    return Task("digits", x[train], y[train], x[test], y[test], "cross_entropy",
                _prior_cross_entropy(y[train], 10), classes=10)


def sequential_digits(seed: int = 0, pixelwise: bool = True, permuted: bool = False,
                      test_fraction: float = 0.25) -> Task:
    """Digits read as a sequence (B, T, C): T=64, C=1 pixel by pixel, or T=8, C=8 row by row."""
    base = digits(seed, test_fraction)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(10_000 + seed)) if permuted else None

    def shape(x: torch.Tensor) -> torch.Tensor:
        if order is not None:
            x = x[:, order]
        return x.reshape(len(x), 64, 1) if pixelwise else x.reshape(len(x), 8, 8)

    name = ("permuted_" if permuted else "") + ("pixel" if pixelwise else "row") + "_digits"
    return Task(name, shape(base.x_train), base.y_train, shape(base.x_test), base.y_test, "cross_entropy",
                base.baseline, classes=10)


def _adding_batch(n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(n, length, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, length, (n,), generator=gen)
    mask = torch.zeros(n, length)
    rows = torch.arange(n)
    mask[rows, first] = 1.0
    mask[rows, second] = 1.0
    x = torch.stack([values, mask], dim=-1)  # (n, T, 2)
    y = (values * mask).sum(dim=1, keepdim=True)  # (n, 1)
    return x, y


def adding(length: int, n_train: int = 2048, n_test: int = 512, seed: int = 0) -> Task:
    """The adding problem over ``length`` steps (>= 2)."""
    _check_positive("n_train", n_train)
    _check_positive("n_test", n_test)
    if not isinstance(length, int) or length < 2:
        raise bad_argument("length", "an int >= 2 (one marked value in each half)", length)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = _adding_batch(n_train, length, gen)
    x_test, y_test = _adding_batch(n_test, length, gen)
    return Task(f"adding_T{length}", x_train, y_train, x_test, y_test, "mse", 1.0 / 6.0)


def _copy_batch(n: int, delay: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    total = delay + 2 * _COPY_LENGTH
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (n, _COPY_LENGTH), generator=gen)
    tokens = torch.zeros(n, total, dtype=torch.long)
    tokens[:, :_COPY_LENGTH] = symbols
    tokens[:, _COPY_LENGTH + delay - 1] = COPY_SYMBOLS + 1  # the delimiter, after T-1 blanks
    targets = torch.zeros(n, total, dtype=torch.long)
    targets[:, -_COPY_LENGTH:] = symbols
    x = torch.nn.functional.one_hot(tokens, COPY_SYMBOLS + 2).float()  # (n, T+20, 10)
    return x, targets


def copy_task(delay: int, n_train: int = 2048, n_test: int = 512, seed: int = 0) -> Task:
    """The copy task with ``delay`` = T: sequences of T + 20 steps, targets of 9 classes (blank + 8)."""
    _check_positive("delay", delay)
    _check_positive("n_train", n_train)
    _check_positive("n_test", n_test)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = _copy_batch(n_train, delay, gen)
    x_test, y_test = _copy_batch(n_test, delay, gen)
    baseline = _COPY_LENGTH * math.log(COPY_SYMBOLS) / (delay + 2 * _COPY_LENGTH)
    return Task(f"copy_T{delay}", x_train, y_train, x_test, y_test, "cross_entropy", baseline,
                classes=COPY_SYMBOLS + 1)


def _recall_batch(n: int, pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.argsort(torch.rand(n, RECALL_KEYS, generator=gen), dim=1)[:, :pairs]  # distinct keys per row
    values = torch.randint(0, RECALL_KEYS, (n, pairs), generator=gen)
    which = torch.randint(0, pairs, (n,), generator=gen)
    rows = torch.arange(n)
    tokens = torch.stack([keys, values + RECALL_KEYS], dim=-1).reshape(n, 2 * pairs)
    tokens = torch.cat([tokens, keys[rows, which].unsqueeze(1)], dim=1)  # (n, 2 * pairs + 1)
    return tokens, values[rows, which]


def recall(pairs: int, n_train: int = 4096, n_test: int = 512, seed: int = 0) -> Task:
    """Associative recall with ``pairs`` key-value pairs (1..16): token ids (B, 2 pairs + 1), 16 classes."""
    _check_positive("n_train", n_train)
    _check_positive("n_test", n_test)
    if not isinstance(pairs, int) or not 1 <= pairs <= RECALL_KEYS:
        raise bad_argument("length", f"an int in [1, {RECALL_KEYS}] (the key-value pairs of a recall task)", pairs)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = _recall_batch(n_train, pairs, gen)
    x_test, y_test = _recall_batch(n_test, pairs, gen)
    return Task(f"recall_{pairs}", x_train, y_train, x_test, y_test, "cross_entropy", math.log(RECALL_KEYS),
                classes=RECALL_KEYS)
