"""A deep ReLU MLP initialised with N(0, 1) weights: each layer multiplies the gradient by ~sqrt(width/2).

    gradmedic check examples/exploding_mlp.py:build
"""

import torch
from torch import nn


def build(depth: int = 10, width: int = 128, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    widths = [32] + [width] * depth
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0)  # the classic mistake: std 1 regardless of fan-in
    return {"model": model, "inputs": torch.randn(64, 32), "targets": torch.randint(0, 10, (64,))}
