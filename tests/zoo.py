"""Pathological and healthy models for the diagnosis tests: small, seeded, seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn


def mlp(depth: int, width: int, act: type[nn.Module], init: str = "default", norm: bool = False,
        d_in: int = 16, d_out: int = 4, seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    widths = [d_in] + [width] * depth
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        lin = nn.Linear(a, b)
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        elif init == "normal1":
            nn.init.normal_(lin.weight, 0.0, 1.0)
        layers += [lin, *([nn.BatchNorm1d(b)] if norm else []), act()]
    return nn.Sequential(*layers, nn.Linear(width, d_out)).to(dtype)


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for x < 0


class LastStepRNN(nn.Module):
    def __init__(self, cell: str = "rnn", hidden: int = 32, nonlinearity: str = "tanh"):
        super().__init__()
        if cell == "rnn":
            self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity=nonlinearity)
        else:
            self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):  # x: (B, T, 2)
        return self.head(self.rnn(x)[0][:, -1])


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):  # (B, C, H, W)
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet(blocks: int = 8, channels: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         *(Block(channels) for _ in range(blocks)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 10))


class Encoder(nn.Module):
    """A pre-LayerNorm transformer encoder over (B, T, C) with a mean-pooled head."""

    def __init__(self, d_model: int = 32, layers: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))
