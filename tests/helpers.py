"""Test helpers: independent recomputations and instrumentation, never the code under test."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter
from pathlib import Path

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


def _from_gradmedic() -> bool:
    """Whether the caller of the patched function (two frames up) is gradmedic's own code."""
    frames = traceback.extract_stack(limit=4)[:-2]
    return any(f.filename.startswith(PACKAGE_DIR) for f in frames)


@contextlib.contextmanager
def count_host_syncs():
    """Count calls that move data between the host and the device, made from gradmedic's own code.

    Two kinds, both blocking on CUDA and both free on the CPU, so that counting them here shows the
    Monitor is free of them between flushes without a GPU:

    - copies of a tensor's value to the host (``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``,
      ``bool(t)``, ``float(t)``...), counted under the method's name;
    - tensors made from host data (``torch.tensor``, ``torch.as_tensor``, ``torch.from_numpy``,
      ``Tensor.new_tensor``, and a Python number or list written into a tensor with ``t[i] = x`` or
      ``t.fill_(x)``), counted under ``"host->device: <call>"``. On the CPU every tensor is on "the
      device", so any such call is counted: the count is an upper bound of the copies on a GPU.
    """
    counts: Counter[str] = Counter()
    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    makers = {n: getattr(torch, n) for n in ("tensor", "as_tensor", "from_numpy")}
    writers = {n: getattr(torch.Tensor, n) for n in ("new_tensor", "__setitem__", "fill_")}

    def wrap(name, fn):
        def patched(self, *a, **k):
            if _from_gradmedic():
                counts[name] += 1
            return fn(self, *a, **k)
        return patched

    def wrap_maker(name, fn):
        def patched(*a, **k):
            if _from_gradmedic():
                counts[f"host->device: torch.{name}"] += 1
            return fn(*a, **k)
        return patched

    def wrap_writer(name, fn):
        def patched(self, *a, **k):
            value = a[-1] if a else None  # new_tensor(data), __setitem__(index, value), fill_(value)
            if not isinstance(value, torch.Tensor) and _from_gradmedic():
                counts[f"host->device: Tensor.{name}"] += 1
            return fn(self, *a, **k)
        return patched

    for n, fn in originals.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    for n, fn in makers.items():
        setattr(torch, n, wrap_maker(n, fn))
    for n, fn in writers.items():
        setattr(torch.Tensor, n, wrap_writer(n, fn))
    try:
        yield counts
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)
        for n, fn in makers.items():
            setattr(torch, n, fn)
        for n, fn in writers.items():
            setattr(torch.Tensor, n, fn)


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process whose parent is ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = cmd
    return found


def aten_host_reads(fn) -> int:
    """Reads of a tensor's value to the host made inside torch's own operators while ``fn`` runs: the
    ``aten::_local_scalar_dense`` calls that ``.item()`` lowers to, seen by the profiler. An operator can make
    one internally (``segment_reduce`` checks its lengths on the host unless ``unsafe=True``), where
    ``count_host_syncs``, which wraps Python calls, cannot see it. Compare with a plain run of the same loop:
    the user's own code (an optimizer, ``loss.item()``) makes some too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")



def lab_first_batch(config: dict):
    """The model a lab run of ``config`` starts from, its task, and the batch of its first step (the run draws it from a
    generator seeded ``seed + 1``), for checking the run's recorded numbers against autograd on the same batch."""
    from gradmedic.lab.experiment import _build_model, _validate, make_task

    full = _validate(config)
    task = make_task(full)
    model = _build_model(full, task)
    gen = torch.Generator().manual_seed(full["seed"] + 1)
    idx = torch.randint(0, len(task.x_train), (full["batch"],), generator=gen)
    return model, task, task.x_train[idx], task.y_train[idx]
