"""``gm.check``: one look at a model, with every probe and the init-time signal view.

The user's model, its gradients, its buffers, its optimizer and the global RNG state are left exactly as
they were, and no copy of the parameters is made for the first look (``steps=0``): the forward runs on the
user's own model inside ``torch.random.fork_rng``, the gradients come from ``torch.autograd.grad`` (never
accumulated into ``.grad``; a plain backward where reentrant checkpointing refuses it), the buffers a
forward updates (BatchNorm's running statistics) and the modules' training flags are put back afterwards
(``_ModelState``). The probes read the gradients through ``.grad`` (the Monitor's contract), so the ones
from ``autograd.grad`` are lent to ``.grad`` for ``monitor.step()`` only and the user's own ``.grad``
tensors are put back untouched. A check on a copy would need the parameters twice over (2.3x the parameter
memory extra on a 1000-layer MLP). Training ``steps`` > 0 changes the weights, so those run on
``copy.deepcopy(model)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, GradmedicWarning, bad_argument, first_line
from gradmedic._graph import GraphReader
from gradmedic._inputs import forward_loss, rebuild_optimizer, split_inputs
from gradmedic._progress import progress
from gradmedic.architecture import clean_name, unwrap
from gradmedic.diagnosis import Report, diagnose
from gradmedic.monitor import Monitor
from gradmedic.probes import SignalProbe, build_probes

__all__ = ["check"]



def check(model: nn.Module, inputs: Any, targets: Any = None, loss_fn: Callable | None = None,
          optimizer: torch.optim.Optimizer | None = None, steps: int = 0) -> Report:
    """Forward and backward on ``model`` itself, no copy (``steps`` > 0: ``steps`` optimizer steps on a
    copy), then diagnose. Everything the model had is put back (see the module docstring).

    ``inputs``: a tensor, a tuple of tensors (positional arguments) or a dict (keyword arguments).
    Without ``loss_fn``: a ``.loss`` in the outputs is used (Hugging Face models given labels), else
    cross-entropy for integer ``targets`` and MSE for float ``targets``, else a fixed-seed random
    projection of the outputs (averaged, so its scale does not grow with the output's size), so that every
    output contributes. With ``steps`` > 0, a fresh copy of
    ``optimizer`` (same class and hyperparameters, empty state) or Adam(lr=1e-3) trains the copy.
    """
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise bad_argument("steps", "a non-negative int (optimizer steps after the first look)", steps)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise bad_argument("optimizer", "a torch.optim.Optimizer or None", optimizer)
    if loss_fn is not None and not callable(loss_fn):
        raise bad_argument("loss_fn", "a callable loss_fn(outputs, targets)", loss_fn)
    if not any(p.requires_grad for p in model.parameters()):
        raise bad_argument("model", "a module with trainable parameters", type(model).__name__)
    args, kwargs = split_inputs(inputs)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    if steps:
        with torch.random.fork_rng(devices=devices):
            monitor, loss_from, graph = _check_a_copy(model, args, kwargs, targets, loss_fn, optimizer, steps,
                                                      _probes())
    else:
        monitor, loss_from, graph = _check_in_place(model, args, kwargs, targets, loss_fn, devices)
    meta = monitor.trace.meta
    meta["check"] = {"steps": steps, "loss": "given" if loss_fn else "default", "loss_from": loss_from}
    for key, read in (("loss_matched", "matched"), ("scoring", "scoring"), ("attended", "attended"),
                      ("branches", "branches")):
        meta[key] = graph[read]
    if optimizer is not None:
        meta["optimized"] = _optimized_layers(model, optimizer)
    return diagnose(monitor.trace)


def _optimized_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The modules (as the trace names them) that own a parameter the user's optimizer holds: the others do not
    move at its steps, by design (a GAN's discriminator in the generator's step)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return sorted(clean_name(name) for name, module in unwrap(model).named_modules()
                  if any(id(p) in held for p in module.parameters(recurse=False)))


# the training-run probes read a run's trend and an optimizer's state over many steps: one look has neither
_RUN_ONLY = ("output_logits", "adam")


def _probes() -> list:
    return [*(p for p in build_probes("full") if p.name not in _RUN_ONLY), SignalProbe()]


def _check_in_place(model: nn.Module, args: tuple, kwargs: dict, targets: Any, loss_fn: Callable | None,
                    devices: list[int]) -> tuple[Monitor, str, dict[str, list[str]]]:
    """One forward and backward on the user's own model, with everything it had put back after."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = _ModelState(model)
    try:
        with torch.random.fork_rng(devices=devices), Monitor(model, probes=_probes(), flush_every=2,
                                                                          live=False) as monitor:
            with GraphReader(model) as reader:
                loss, how = forward_loss(model, args, kwargs, targets, loss_fn)
            graph = reader.read(loss)
            extra = [t for probe in monitor.probes for t in probe.gradient_inputs()]
            for p, g in zip(params, _gradients(loss, params, extra), strict=True):
                p.grad = g  # lent to the probes (they read .grad) until the state is restored below
            monitor.step(loss.detach())
    finally:
        state.restore()
    return monitor, how, graph


def _gradients(loss: torch.Tensor, params: list[nn.Parameter],
               extra: Sequence[torch.Tensor] = ()) -> list[torch.Tensor | None]:
    """d loss / d params by ``torch.autograd.grad``: no ``.grad`` written, no parameter hook run. ``extra``
    (``Probe.gradient_inputs``: the time-step probe's inputs) are asked for too, so that their hooks fire, and
    their gradients dropped.

    Except under reentrant activation checkpointing (``checkpoint(..., use_reentrant=True)``), whose graph node
    has the block's inputs as its only edges: ``autograd.grad`` either refuses it or, when nothing upstream of
    the block is asked for, skips it and returns None for every parameter inside (silently: ``allow_unused``).
    Then a plain ``loss.backward()`` into ``.grad`` emptied first (``_ModelState`` puts the user's own back).
    A custom autograd Function may run a backward of its own inside its backward (Reformer's reversible layers
    recompute their block and call ``torch.autograd.backward`` on it): that one writes ``.grad`` of the parameters
    inside, which ``autograd.grad`` returns as None. So ``.grad`` is emptied first (the user's tensors are kept by
    ``_ModelState``, never written into) and what such a Function wrote there is added to what ``autograd.grad``
    returned. A backward that fails says so in one line."""
    for p in params:
        p.grad = None
    try:
        if not _has_reentrant_checkpoint(loss):
            found = torch.autograd.grad(loss, [*params, *extra], allow_unused=True)[:len(params)]
            return [g if p.grad is None else p.grad if g is None else g + p.grad
                    for p, g in zip(params, found, strict=True)]
        loss.backward()
        return [p.grad for p in params]
    except Exception as error:  # a custom autograd Function's backward may raise anything (ValueError, ...)
        raise _backward_failed(error) from error


def _backward_failed(error: BaseException) -> GradmedicError:
    return GradmedicError(f"The model's backward failed ({type(error).__name__}: {first_line(error)}); check that "
                          "one loss.backward() on these inputs runs outside gradmedic.")


def _has_reentrant_checkpoint(loss: torch.Tensor) -> bool:
    """Whether the loss's autograd graph holds a reentrant checkpoint's node (a walk over the graph, once)."""
    seen: set[Any] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


def _check_a_copy(model: nn.Module, args: tuple, kwargs: dict, targets: Any, loss_fn: Callable | None,
                  optimizer: torch.optim.Optimizer | None, steps: int,
                  probes: list) -> tuple[Monitor, str, dict[str, list[str]]]:
    """``steps`` optimizer steps change the weights: those run on a deep copy."""
    try:
        work = copy.deepcopy(model)
    except Exception as error:
        raise GradmedicError(f"check with steps > 0 trains a copy, and copy.deepcopy(model) failed "
                             f"({type(error).__name__}: {first_line(error)}); make the model deep-copyable, or "
                             "use steps=0 (no copy).") from error
    for p in work.parameters():
        p.grad = None
    opt = _optimizer_for(work, model, optimizer)
    # live=False: check reports at its end (its first looks' flushes would say findings mid-check)
    with Monitor(work, probes=probes, flush_every=steps + 2, live=False) as monitor, GraphReader(work) as reader, \
            progress("gm.check: training steps", steps + 1) as bar:
        for step in range(steps + 1):
            if step:
                opt.step()
                opt.zero_grad(set_to_none=True)
            reader.clear()
            loss, how = forward_loss(work, args, kwargs, targets, loss_fn)
            if step == steps:  # the graph of the last step: the one whose numbers the trace ends with
                graph = reader.read(loss)
            try:
                loss.backward()
            except Exception as error:  # not only RuntimeError: a custom backward raises what it likes
                raise _backward_failed(error) from error
            monitor.step(loss)
            bar.advance()
    return monitor, how, graph


class _ModelState:
    """What a forward and a check's Monitor can change on a module tree, saved to be put back exactly.

    Per module: the training flag, the ``.grad`` of each parameter (the tensor object, never written), the
    buffers (the objects and their values: BatchNorm's running statistics and step count are updated in
    place by a training-mode forward) and tensor attributes set by forward pre-hooks (the old
    ``spectral_norm`` recomputes ``module.weight`` as a plain attribute). Buffers are a small part of a
    model, so their values are cloned. Parameters are not: a forward does not change them, except
    ``nn.Embedding``/``EmbeddingBag`` with ``max_norm``, which renormalise the rows they look up in place
    (those tables are cloned). Any other parameter a forward writes in place (user code) is caught by its
    version counter and named in a warning: it cannot be undone without the copy this avoids.
    """

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.buffers = [(m, dict(m._buffers)) for m in self.modules]
        with torch.no_grad():
            self.values = [(b, b.clone()) for _, bufs in self.buffers for b in bufs.values()
                           if isinstance(b, torch.Tensor)]
        self.attributes = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
                           for m in self.modules]
        with torch.no_grad():
            self.renormed = [(m.weight, m.weight.detach().clone()) for m in self.modules
                             if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
        saved = {id(p) for p, _ in self.renormed}
        self.versions = [(n, p, p._version) for n, p in model.named_parameters() if id(p) not in saved]

    def restore(self) -> None:
        for m, flag in zip(self.modules, self.training, strict=True):
            m.training = flag
        for p, g in self.grads:
            p.grad = g
        with torch.no_grad():
            for b, value in self.values:
                if not torch.equal(b, value):
                    b.copy_(value)
        for m, bufs in self.buffers:
            now = m._buffers
            if now.keys() != bufs.keys() or any(now[k] is not v for k, v in bufs.items()):
                now.clear()
                now.update(bufs)
        for m, attrs in self.attributes:
            for k, v in attrs.items():
                if vars(m).get(k) is not v:
                    setattr(m, k, v)
        with torch.no_grad():
            for p, value in self.renormed:
                p.copy_(value)
        changed = [n for n, p, version in self.versions if p._version != version]
        if changed:
            warnings.warn(f"gradmedic: the model's forward wrote into its own parameter(s) {changed[:3]} in place "
                          "during gm.check, which runs on your model without a copy (steps=0); they keep the "
                          "new values. Call check on copy.deepcopy(model) to keep them.", GradmedicWarning,
                          stacklevel=3)


def _optimizer_for(work: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """The user's optimizer, rebuilt over the copy's parameters with its groups, or Adam 1e-3 without one."""
    if optimizer is None:
        return torch.optim.Adam(work.parameters(), lr=1e-3)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    copies = list(work.parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [copies[index[id(p)]] for p in g["params"] if id(p) in index]} for g in optimizer.param_groups]
    try:
        return rebuild_optimizer(optimizer, [g for g in groups if g["params"]])
    except Exception as error:
        raise GradmedicError(f"Could not rebuild {type(optimizer).__name__} for the copy ({first_line(error)}); "
                             "pass optimizer=None to train the copy with Adam(lr=1e-3).") from error
