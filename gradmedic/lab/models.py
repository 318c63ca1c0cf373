"""The lab's model families, built from one flat description each so a suite can sweep any field.

- ``MLPSpec`` / ``build_mlp``: depth x width, activation, init, normalisation, dropout, and skip paths:
  residual (``y = x + f(x)``), ReZero (``y = x + alpha f(x)``, alpha = 0 at init) or long skips (the
  input of every ``skip_every``-th block added to its output, as U-Net/DenseNet-style long paths do).
- ``CNNSpec`` / ``build_cnn``: 3x3 conv blocks on 8x8 digits with the same options, global-average head.
- ``RNNSpec`` / ``build_rnn``: tanh RNN, ReLU RNN, IRNN (ReLU + identity recurrence), LSTM (optionally
  forget-gate bias 1) or GRU, reading (B, T, C) and predicting from the last step, or at every step.

Inits come from ``gradmedic.remedies`` (torch.nn.init underneath); "default" keeps PyTorch's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradmedic._errors import bad_argument
from gradmedic.remedies import forget_gate_bias_, he_, identity_recurrent_, orthogonal_, xavier_
from gradmedic.remedies.surgery import ACTIVATIONS

__all__ = ["CNNSpec", "MLPSpec", "RNNSpec", "build_cnn", "build_mlp", "build_rnn"]

INITS = ("default", "he", "xavier", "glorot", "orthogonal", "normal1")
SKIPS = ("none", "residual", "rezero", "long")
CELLS = ("tanh", "relu", "irnn", "lstm", "gru")


@dataclass(frozen=True)
class MLPSpec:
    depth: int = 10  # hidden layers
    width: int = 64
    activation: str = "relu"  # a key of gradmedic.remedies.ACTIVATIONS
    # one of INITS. "glorot" is Glorot & Bengio's gain-1 Xavier (what He et al. 2015 compared against);
    # "xavier" is gradmedic's remedy, which scales by the following activation's gain; "normal1" is the
    # classic N(0, 1) mistake
    init: str = "default"
    # for "glorot" and "orthogonal": the weights' gain sigma_w (0 keeps the init's own: 1 for glorot, the
    # following activation's for orthogonal, 5/3 for tanh). Gain 1 is tanh's critical point with zero biases.
    gain: float = 0.0
    norm: str = "none"  # "none", "batch" or "layer"
    skip: str = "none"  # one of SKIPS
    skip_every: int = 2  # for skip="long": blocks spanned by each long skip
    dropout: float = 0.0
    d_in: int = 64
    d_out: int = 10


class _Block(nn.Module):
    """Linear -> [norm] -> activation -> [dropout], with an optional skip around it."""

    def __init__(self, spec: MLPSpec | CNNSpec, conv: bool):
        super().__init__()
        width = spec.channels if conv else spec.width  # type: ignore[union-attr]
        layers: list[nn.Module] = [nn.Conv2d(width, width, 3, padding=1) if conv else nn.Linear(width, width)]
        if spec.norm == "batch":
            layers.append(nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width))
        elif spec.norm == "layer":
            layers.append(nn.GroupNorm(1, width) if conv else nn.LayerNorm(width))
        layers.append(ACTIVATIONS[spec.activation]())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        self.branch = nn.Sequential(*layers)
        self.skip = spec.skip if spec.skip in ("residual", "rezero") else "none"
        if self.skip == "rezero":
            self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.skip == "residual":
            return x + out
        if self.skip == "rezero":
            return x + self.alpha * out
        return out


class _Stack(nn.Module):
    """stem -> blocks (with long skips every k blocks when asked) -> head."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module, long_every: int | None):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.long_every = long_every

    def body(self, h: torch.Tensor) -> torch.Tensor:
        """The blocks alone: the same-width map whose input-output Jacobian the lab measures."""
        anchor = h
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.long_every and (i + 1) % self.long_every == 0:
                h = h + anchor  # a long path from k blocks back
                anchor = h
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _validate(spec: MLPSpec | CNNSpec) -> None:
    if not isinstance(spec.depth, int) or spec.depth < 1:
        raise bad_argument("depth", "a positive int", spec.depth)
    if spec.activation not in ACTIVATIONS:
        raise bad_argument("activation", f"one of {sorted(ACTIVATIONS)}", spec.activation)
    if spec.init not in INITS:
        raise bad_argument("init", f"one of {INITS}", spec.init)
    if spec.norm not in ("none", "batch", "layer"):
        raise bad_argument("norm", '"none", "batch" or "layer"', spec.norm)
    if spec.skip not in SKIPS:
        raise bad_argument("skip", f"one of {SKIPS}", spec.skip)
    if not 0 <= spec.dropout < 1:
        raise bad_argument("dropout", "a float in [0, 1)", spec.dropout)


def _initialise(model: nn.Module, init: str, gain: float = 0.0) -> nn.Module:
    if init == "he":
        he_(model)
    elif init == "xavier":
        xavier_(model)
    elif init == "orthogonal":
        orthogonal_(model, gain=gain or None)
    elif init == "glorot":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_normal_(m.weight, gain=gain or 1.0)
                nn.init.zeros_(m.bias)
    elif init == "normal1":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 1.0)
    return model


def build_mlp(spec: MLPSpec, seed: int = 0) -> nn.Module:
    """An MLP over (B, d_in) -> (B, d_out): a stem layer, ``depth - 1`` same-width blocks, a head."""
    _validate(spec)
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Linear(spec.d_in, spec.width), ACTIVATIONS[spec.activation]())
    blocks = [_Block(spec, conv=False) for _ in range(spec.depth - 1)]
    long_every = spec.skip_every if spec.skip == "long" else None
    return _initialise(_Stack(stem, blocks, nn.Linear(spec.width, spec.d_out), long_every), spec.init, spec.gain)


@dataclass(frozen=True)
class CNNSpec:
    depth: int = 6  # conv layers
    channels: int = 16
    activation: str = "relu"
    init: str = "default"
    gain: float = 0.0
    norm: str = "none"
    skip: str = "none"
    skip_every: int = 2
    dropout: float = 0.0
    in_channels: int = 1
    d_out: int = 10


def build_cnn(spec: CNNSpec, seed: int = 0) -> nn.Module:
    """A CNN over (B, C, H, W) -> (B, d_out): a stem conv, ``depth - 1`` same-shape conv blocks, pooling."""
    _validate(spec)
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(spec.in_channels, spec.channels, 3, padding=1), ACTIVATIONS[spec.activation]())
    blocks = [_Block(spec, conv=True) for _ in range(spec.depth - 1)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.channels, spec.d_out))
    long_every = spec.skip_every if spec.skip == "long" else None
    return _initialise(_Stack(stem, blocks, head, long_every), spec.init, spec.gain)


@dataclass(frozen=True)
class RNNSpec:
    cell: str = "tanh"  # one of CELLS
    hidden: int = 64
    d_in: int = 2
    d_out: int = 1
    forget_bias: bool = False  # LSTM only: forget-gate bias 1
    # tanh/relu cells: the recurrent matrix W_hh drawn orthogonal and scaled by this gain (0 keeps
    # PyTorch's default). A gain above 1 makes the recurrence expand: gradients through time explode.
    recurrent_gain: float = 0.0
    every_step: bool = False  # predict at every step (copy task) instead of from the last one


class _Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module, head: nn.Module, every_step: bool):
        super().__init__()
        self.rnn = rnn
        self.head = head
        self.every_step = every_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        out = self.rnn(x)[0]  # (B, T, H)
        return self.head(out if self.every_step else out[:, -1])


def build_rnn(spec: RNNSpec, seed: int = 0) -> nn.Module:
    if spec.cell not in CELLS:
        raise bad_argument("cell", f"one of {CELLS}", spec.cell)
    if spec.recurrent_gain and spec.cell not in ("tanh", "relu"):
        raise bad_argument("recurrent_gain", "0 unless cell is 'tanh' or 'relu'", spec.recurrent_gain)
    if spec.forget_bias and spec.cell != "lstm":
        raise bad_argument("forget_bias", "False unless cell is 'lstm'", spec.forget_bias)
    torch.manual_seed(seed)
    if spec.cell in ("tanh", "relu", "irnn"):
        rnn: nn.Module = nn.RNN(spec.d_in, spec.hidden, batch_first=True,
                                nonlinearity="tanh" if spec.cell == "tanh" else "relu")
        if spec.cell == "irnn":
            identity_recurrent_(rnn)
        elif spec.recurrent_gain:
            nn.init.orthogonal_(rnn.weight_hh_l0, gain=spec.recurrent_gain)
    else:
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[spec.cell](spec.d_in, spec.hidden, batch_first=True)
        if spec.forget_bias:
            forget_gate_bias_(rnn, 1.0)
    return _Recurrent(rnn, nn.Linear(spec.hidden, spec.d_out), spec.every_step)
