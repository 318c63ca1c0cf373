"""A deep sigmoid MLP watched by gradmedic's Monitor: the classic vanishing-gradient picture.

Run: python examples/sigmoid_mlp.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradmedic as gm


def build(depth: int = 10, width: int = 64, seed: int = 0) -> dict:
    """A factory in the shape ``gradmedic check`` expects: model, inputs, targets, loss_fn."""
    torch.manual_seed(seed)
    widths = [32] + [width] * depth + [10]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = nn.Sequential(*layers[:-1])
    inputs = torch.randn(128, 32)
    targets = (inputs[:, :10].argmax(dim=1))  # a learnable rule, so the loss can fall
    return {"model": model, "inputs": inputs, "targets": targets, "loss_fn": nn.functional.cross_entropy}


def main(steps: int = 30) -> gm.Trace:
    case = build()
    model, x, y, loss_fn = case["model"], case["inputs"], case["targets"], case["loss_fn"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with gm.Monitor(model, optimizer, preset="full") as monitor:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
    return monitor.trace


if __name__ == "__main__":
    print(main().summary())
