"""Test helpers: independent recomputations and instrumentation, never the code under test."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter

import torch
from torch import nn

import gradmedic

PACKAGE_DIR = os.path.dirname(gradmedic.__file__)

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def hook_state(model: nn.Module) -> dict:
    """Every hook dict of every module, plus tensor hooks on parameters, as comparable keys."""
    state = {}
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            d = getattr(module, attr, None)
            if d is not None:
                state[(name, attr)] = tuple(d.keys())
    for name, p in model.named_parameters():
        state[("param", name)] = tuple((p._backward_hooks or {}).keys())
    return state


def sigmoid_mlp(widths=(16, 12, 12, 12, 4), act=nn.Sigmoid, seed=0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).to(dtype)


@contextlib.contextmanager
def count_host_syncs():
    """Count calls that copy a tensor's value to the host, made from gradmedic's own code.

    On CUDA these are the calls that block until the device is done (``.item()``, ``.cpu()``,
    ``.tolist()``, ``.numpy()``, ``bool(t)``, ``float(t)``...). On the CPU they cost nothing, but the
    same calls would sync on a GPU, so counting them here shows the Monitor is sync-free between
    flushes without a GPU.
    """
    counts: Counter[str] = Counter()
    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name, fn):
        def patched(self, *a, **k):
            frames = traceback.extract_stack(limit=3)[:-1]
            if any(f.filename.startswith(PACKAGE_DIR) for f in frames):
                counts[name] += 1
            return fn(self, *a, **k)
        return patched

    for n, fn in originals.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)
