"""Sick models of different kinds, each with a batch and a learnable target, for the treat tests.

Each entry builds (model, inputs, targets, loss_fn) from a seed; the targets depend on the inputs in a way
the model can learn, so "trains better" is measurable: for the recurrent ones the target depends on the
*first* steps of a long sequence, so the gradient must travel back through time.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def mlp(depth: int, act: type[nn.Module], std: float | None = None, width: int = 64, d_in: int = 16,
        d_out: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = [d_in] + [width] * depth
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        lin = nn.Linear(a, b)
        if std is not None:  # N(0, std^2 / fan_in), zero bias
            nn.init.normal_(lin.weight, 0.0, std / math.sqrt(a))
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def _classify(model: nn.Module, seed: int, d_in: int = 16, classes: int = 4, n: int = 256) -> dict:
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, d_in, generator=gen)
    return {"model": model, "inputs": x, "targets": x[:, :classes].argmax(dim=1), "loss_fn": F.cross_entropy}


class LastStep(nn.Module):
    def __init__(self, cell: str, hidden: int = 32):
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):  # (B, T, 2) -> (B,)
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def _recall(model: nn.Module, seed: int, length: int, n: int = 64, **budget) -> dict:
    """The target is the first value of channel 0: only the gradient through time finds it."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.rand(n, length, 2, generator=gen)
    return {"model": model, "inputs": x, "targets": x[:, 0, 0], "loss_fn": F.mse_loss, **budget}


def _regress(model: nn.Module, seed: int, d_in: int = 16, n: int = 256) -> dict:
    """A smooth target; a net whose outputs explode starts with an enormous MSE."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.stack([x[:, :4].sum(1), x[:, 4:8].prod(1), x[:, 8].sin(), x[:, 9:].mean(1)], dim=1)
    return {"model": model, "inputs": x, "targets": y, "loss_fn": F.mse_loss}


def _normal1(model: nn.Module) -> nn.Module:
    """Weights N(0, 1) whatever the fan-in: each layer multiplies the signal by about sqrt(width / 2)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0)
    return model


def _dead_relu(seed: int) -> nn.Module:
    model = mlp(6, nn.ReLU)
    with torch.no_grad():
        model[2].bias.fill_(-4.0)  # most units of the second hidden layer never fire
    return model


def _sigmoid_cnn() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 8, 3, padding=1), nn.Sigmoid()]
    for _ in range(7):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _images(model: nn.Module, seed: int, n: int = 64, **budget) -> dict:
    """The class is the quartile of the image's mean: position-free, so a conv net with pooling can learn it."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, 1, 8, 8, generator=gen) + torch.randn(n, 1, 1, 1, generator=gen)
    mean = x.mean(dim=(1, 2, 3))
    targets = torch.bucketize(mean, mean.quantile(torch.tensor([0.25, 0.5, 0.75])))
    return {"model": model, "inputs": x, "targets": targets, "loss_fn": F.cross_entropy, **budget}


class PostLN(nn.Module):
    """A deep post-LN transformer encoder (torch.nn's default, norm_first=False) with a mean-pooled head."""

    def __init__(self, layers: int = 16, d_model: int = 32):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 4)

    def forward(self, x):  # (B, T, C) -> (B, 4)
        return self.head(self.encoder(x).mean(dim=1))


def _tokens(model: nn.Module, seed: int, n: int = 32, length: int = 8, d_model: int = 32, **budget) -> dict:
    """The class is the largest of 4 channels averaged over the sequence."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, length, d_model, generator=gen)
    return {"model": model, "inputs": x, "targets": x[:, :, :4].mean(dim=1).argmax(dim=1), "loss_fn": F.cross_entropy,
            **budget}


# name -> builder(seed) -> case dict (model, inputs, targets, loss_fn; optionally the training budget:
# steps and Adam's lr, 100 and 1e-3 when not given; check_steps: check after that many steps of it)
SICK = {
    "sigmoid_mlp_10": lambda s: _classify(mlp(10, nn.Sigmoid), s),
    "sigmoid_mlp_20": lambda s: _classify(mlp(20, nn.Sigmoid), s),
    "tanh_mlp_40_default": lambda s: _classify(mlp(40, nn.Tanh), s),
    "tanh_mlp_40_chaotic": lambda s: _classify(mlp(40, nn.Tanh, std=3.0), s),
    "relu_mlp_10_exploding": lambda s: _regress(_normal1(mlp(10, nn.ReLU)), s),
    "relu_mlp_6_dead": lambda s: _classify(_dead_relu(s), s),
    "sigmoid_cnn_8": lambda s: _images(_sigmoid_cnn(), s, steps=150, lr=3e-3),
    "tanh_rnn_60": lambda s: _recall(LastStep("rnn"), s, 60, steps=150, lr=1e-2),
    "lstm_60": lambda s: _recall(LastStep("lstm"), s, 60, steps=300, lr=3e-3),
    # a post-LN transformer is healthy at init and breaks in training without warmup (Xiong et al. 2020):
    # it is checked after 20 steps at the learning rate it is trained with
    "post_ln_transformer_24": lambda s: _tokens(PostLN(24), s, steps=60, lr=1e-2, check_steps=20),
}


def build(name: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return SICK[name](seed)
