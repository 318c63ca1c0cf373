"""A ReLU MLP whose units died: biases pushed far negative, as one too-large step can do.

    gradmedic check examples/dead_relu.py:build
"""

import torch
from torch import nn


def build(depth: int = 6, width: int = 64, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    widths = [20] + [width] * depth
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 5))
    with torch.no_grad():
        model[2].bias.fill_(-4.0)  # the second hidden layer: most of its units never fire
    x = torch.randn(128, 20)
    return {"model": model, "inputs": x, "targets": torch.randint(0, 5, (128,))}
