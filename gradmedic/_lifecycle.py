"""A Monitor's ties to the model it watches: released when nobody holds the Monitor, and kept on the model's current
parameters when they are replaced.

Dropped without ``close()``: the probes' hooks stay registered on the model, and the model holds them, so they kept
the Monitor alive (a probe's failure callback was the Monitor's bound method): 12 hooks stayed for good, memory grew
~7.5 KB a step and the model ran 2.6x slower. Here the probes hold the Monitor weakly, and a finaliser (holding the
probes, never the Monitor) takes every hook off when the Monitor is collected, and says so once.

Parameters replaced (``load_state_dict(..., assign=True)``, ``model[0].weight = nn.Parameter(...)``): the gradient
probe holds the parameter objects it was given, so it went on reading the old ones (no gradient: NaN at every layer;
or the old weight's norm). torch calls a global hook on every parameter registration; it only raises a flag (no cost
per step), and the Monitor re-reads the parameters before its next measurement. A replacement that bypasses the hook
(a write into ``module._parameters``) is found at the next flush by comparing identities (Python over the modules,
once per flush, never per step). Under torch.distributed, where sharding wrappers (FSDP) swap parameters themselves at
every step, nothing is watched: create the Monitor after loading or replacing parameters (the Monitor's docstring).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from gradmedic._errors import GradmedicWarning
from gradmedic.architecture import own_parameters

__all__ = ["NewModuleWatch", "ParameterWatch", "release_when_dropped", "weak_callback"]


def weak_callback(method: Callable[..., Any]) -> Callable[..., None]:
    """A bound method called through a weak reference: its object may be collected while the callback lives on."""
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call


def release_when_dropped(monitor: Any) -> weakref.finalize:
    """Take the Monitor's hooks off the model when it is collected without ``close()``; ``detach()`` the result on
    close. Not run at interpreter exit (nothing to release then)."""
    finaliser = weakref.finalize(monitor, _release, list(monitor.probes), monitor._eager, type(monitor.model).__name__)
    finaliser.atexit = False
    return finaliser


def _release(probes: list[Any], eager: Any, model: str) -> None:
    for probe in probes:
        probe.remove_hooks()  # never raises
    try:
        eager.hold(False)
        warnings.warn(f"gradmedic: a Monitor of {model} was dropped without close(); its hooks were taken off the "
                      "model and its trace is lost. Call monitor.close() or use `with gm.Monitor(...) as monitor:`.",
                      GradmedicWarning, stacklevel=2)
    except Exception:  # noqa: BLE001,S110 - a finaliser must not raise (warnings may be errors under a test runner)
        pass


def current_parameters(layers: Any) -> list[list[nn.Parameter]]:
    """The trainable parameters each indexed module owns now, by the rules of ``LayerIndex``: first owner only; a
    parameter already held stays whatever its ``requires_grad`` (a layer frozen mid-run is reported as frozen)."""
    held = {id(p) for ps in layers.params for p in ps}
    seen: set[int] = set()
    out = []
    for module in layers.modules:
        owned = []
        for p in own_parameters(module):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad or id(p) in held:
                owned.append(p)
        out.append(owned)
    return out


class ParameterWatch:
    """Raises ``changed`` when a parameter is registered on a module of ``layers`` (the global torch hook);
    ``replaced()`` says whether the parameters differ from those held. Holds the Monitor's layers only."""

    def __init__(self, layers: Any):
        self.layers = layers
        self.changed = False
        rows = layers.row
        flag = weakref.ref(self)

        def on_register(module: nn.Module, name: str, param: Any) -> None:
            watch = flag()
            if watch is not None and id(module) in rows:
                watch.changed = True

        register = getattr(nn.modules.module, "register_module_parameter_registration_hook", None)
        self._hook = register(on_register) if register is not None else None
        if self._hook is not None:
            weakref.finalize(self, self._hook.remove)

    def replaced(self) -> list[list[nn.Parameter]] | None:
        """The current parameters when they differ from those held (by identity), else None."""
        self.changed = False
        now = current_parameters(self.layers)
        same = all(len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
                   for a, b in zip(now, self.layers.params, strict=True))
        return None if same else now

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def follow(monitor: Any) -> None:
    """Put the Monitor on the model's current parameters, if they were replaced: called at the end of a flush, when
    every probe's buffer is empty. Probes without hooks (measured at ``step()`` from the parameters they hold) are
    attached again; a hook probe reads what the forward uses, which is the current parameters already."""
    watch = monitor._params_watch
    if watch is None:
        return
    now = watch.replaced()
    if now is None:
        return
    layers = monitor.layers
    layers.params[:] = now
    for probe in monitor.probes:
        if probe.uses_hooks or probe.failed:
            continue
        try:
            probe.detach()
            probe.attach(layers, monitor.flush_every + 1)
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            probe.fail(error)
    monitor._trace.meta["params"] = {name: sum(p.numel() for p in ps)
                                     for name, ps in zip(layers.names, now, strict=True) if ps}


class NewModuleWatch:
    """Warn once when a submodule is added to (or replaced in) the model while the Monitor is open: the probes index
    the model once, so the new module is not measured, and silence would hide the gap. torch calls a global
    registration hook for every module assignment: no cost per step. The hook holds the Monitor weakly."""

    def __init__(self, monitor: Any):
        this = weakref.ref(monitor)

        def on_register(parent: nn.Module, name: str, module: nn.Module | None) -> None:
            target = this()
            if target is None or target._closed or module is None:
                return
            try:
                _said_new_module(target, parent, name, module)
            except Exception:  # noqa: BLE001,S110 - a warning is not worth breaking the user's code
                pass

        register = getattr(nn.modules.module, "register_module_module_registration_hook", None)
        self._hook = register(on_register) if register is not None else None
        if self._hook is not None:  # a Monitor dropped without close() takes its hook along
            weakref.finalize(monitor, self._hook.remove)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _said_new_module(monitor: Any, parent: nn.Module, name: str, module: nn.Module) -> None:
    layers = monitor.layers
    if id(parent) not in layers.row or id(module) in layers.row or "new module" in monitor._warned:
        return
    monitor._warned.add("new module")
    parent_name = layers.names[layers.row[id(parent)]]
    qualified = f"{parent_name}.{name}" if parent_name else name
    warnings.warn(f"gradmedic: module {qualified!r} ({type(module).__name__}) was added to the model after the "
                  "Monitor was created and is not measured; create the Monitor after changing the model "
                  "(monitor.close(), then gm.Monitor(model, ...)).", GradmedicWarning, stacklevel=4)
