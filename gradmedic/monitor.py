"""Monitor: attaches probes to a model, runs them on schedule, flushes their buffers into a Trace.

Hooks are registered only for the steps a probe is scheduled on (armed at the end of the previous
``step()``), so an unscheduled step runs the user's model with no gradmedic code in it at all.
Statistics stay on the model's device until a flush (every ``flush_every`` steps, on ``close()`` and
when ``.trace`` is read). A probe that raises is switched off with one warning; the user's forward,
backward and optimizer step go on as if it had never been there.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic._errors import GradmedicError, GradmedicWarning, bad_argument
from gradmedic.probes import PRESETS, LayerIndex, Probe, build_probes
from gradmedic.probes.base import Chunk, StepBuffer, buffer_dtype
from gradmedic.trace import Trace

__all__ = ["Monitor"]


class Monitor:
    """Watch gradients through a training run.

    ``preset``: ``"cheap"`` (gradient norms every 50 steps), ``"standard"`` (default: gradients and
    backward signal every 20 steps, activations, time steps and NaN/Inf every 100) or ``"full"``
    (everything, every step). ``every`` overrides every probe's period; ``probes`` replaces the preset
    with probe instances of your own.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 preset: str = "standard", every: int | None = None, probes: list[Probe] | None = None,
                 flush_every: int = 100):
        if not isinstance(model, nn.Module):
            raise bad_argument("model", "a torch.nn.Module", model)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise bad_argument("optimizer", "a torch.optim.Optimizer or None", optimizer)
        if preset not in PRESETS:
            raise bad_argument("preset", f"one of {sorted(PRESETS)}", preset)
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise bad_argument("every", "a positive int or None", every)
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise bad_argument("flush_every", "a positive int (steps between device-to-host copies)", flush_every)
        if probes is not None and not all(isinstance(p, Probe) for p in probes):
            raise bad_argument("probes", "a list of gradmedic probe instances", probes)
        if not any(True for _ in model.parameters()):
            raise bad_argument("model", "a module with parameters", type(model).__name__,
                               "There is no gradient to watch in a model without parameters.")
        self.model = model
        self.optimizer = optimizer
        self.flush_every = flush_every
        self.preset = preset if probes is None else "custom"
        self.layers = LayerIndex(model)
        self.probes: list[Probe] = list(probes) if probes is not None else build_probes(preset, every)
        self._warned: set[str] = set()
        for probe in self.probes:
            probe.on_failure = self._on_failure
            probe.attach(self.layers, flush_every + 1)
        # loss and learning rate at every step, in a one-row StepBuffer; flushed as scalars, not grid rows
        self._run = StepBuffer(flush_every + 1, [""], ["loss", "lr"], self.layers.device,
                               buffer_dtype(self.layers.device))
        self._trace = Trace(self._meta())
        self._step = 0
        self._since_flush = 0
        self._armed: list[Probe] = []
        self._closed = False
        self._arm(0)

    def _meta(self) -> dict[str, Any]:
        layers = self.layers
        params = {name: sum(p.numel() for p in ps) for name, ps in zip(layers.names, layers.params, strict=True)
                  if ps}
        return {"model": type(self.model).__name__, "preset": self.preset, "modules": layers.names,
                "types": {n: type(m).__name__ for n, m in zip(layers.names, layers.modules, strict=True)},
                "params": params, "roles": dict(layers.roles), "dtype": str(layers.param_dtype).removeprefix("torch."),
                "device": str(layers.device), "probes": [repr(p) for p in self.probes],
                "torch": torch.__version__}

    # --- the user's loop ------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called."""
        return self._step

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record this training step; call after ``loss.backward()``. ``loss`` is optional."""
        if self._closed:
            raise GradmedicError("Monitor.step() was called after close(); create a new Monitor to go on.")
        step = self._step
        for probe in self.probes:
            if probe.should_compute(step) and (not probe.uses_hooks or probe in self._armed):
                self._safely(probe, probe.collect, step)
        self._disarm(keep=step + 1)
        self._record_run(step, loss)
        for probe in self.probes:
            self._safely(probe, probe.after_step, step, probe.should_compute(step + 1))
        self._step += 1
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()
        self._arm(self._step)

    def _record_run(self, step: int, loss: torch.Tensor | float | None) -> None:
        try:
            lr = self.optimizer.param_groups[0].get("lr") if self.optimizer is not None else None
            if loss is None and lr is None:
                return
            slot = self._run.open(step)
            for col, value in enumerate((loss, lr)):
                if isinstance(value, torch.Tensor):
                    self._run.values[slot, 0, col] = value.detach().reshape(-1)[0]
                elif value is not None:
                    self._run.values[slot, 0, col] = float(value)
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._warn("run", error)

    def _drain_run(self) -> Chunk | None:
        grid = self._run.drain()
        if grid is None or not grid.layers:  # nothing but NaN was recorded (drain drops such rows)
            return None
        scalars = {}
        for j, name in enumerate(grid.metrics):
            column = grid.values[:, 0, j]
            measured = ~np.isnan(column)
            if measured.any():
                scalars[name] = (grid.steps[measured], column[measured])
        return Chunk(steps=np.zeros(0, dtype=np.int64), layers=[], metrics=[], values=np.zeros((0, 0, 0)),
                     scalars=scalars)

    def _arm(self, step: int) -> None:
        for probe in self.probes:
            if probe.uses_hooks and probe.should_compute(step) and probe not in self._armed:
                if self._safely(probe, probe.arm):
                    self._armed.append(probe)

    def _disarm(self, keep: int | None = None) -> None:
        """Remove hooks; a probe also due at step ``keep`` keeps its hooks and only resets its state."""
        staying = []
        for probe in self._armed:
            if keep is not None and probe.should_compute(keep):
                if self._safely(probe, probe.reset):
                    staying.append(probe)
            else:
                self._safely(probe, probe.disarm)
        self._armed = staying

    # --- flushing and closing -------------------------------------------------------------------
    def flush(self) -> None:
        """Move every probe's device buffer into the trace (one device-to-host copy per probe)."""
        for probe in self.probes:
            chunk = self._safely(probe, probe.flush)
            if isinstance(chunk, Chunk):
                self._trace.extend(chunk)
        try:
            chunk = self._drain_run()
            if chunk is not None:
                self._trace.extend(chunk)
        except Exception as error:  # noqa: BLE001
            self._warn("run", error)
        self._since_flush = 0

    @property
    def trace(self) -> Trace:
        """The trace so far (reading it flushes what is still on the device)."""
        if not self._closed:
            self.flush()
        return self._trace

    def close(self) -> None:
        """Flush and remove every hook; the model is left exactly as it was. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        self._disarm()
        for probe in self.probes:
            try:
                probe.detach()
            except Exception as error:  # noqa: BLE001
                self._warn(probe.name, error)
        self._closed = True

    def diagnose(self):
        """Findings about the run so far: the same as ``gm.diagnose(monitor.trace)``."""
        from gradmedic.diagnosis import diagnose  # a later stage: imported on use, not at import time

        return diagnose(self.trace)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return f"Monitor({type(self.model).__name__}, preset={self.preset!r}, {state})"

    # --- failure isolation ----------------------------------------------------------------------
    def _safely(self, probe: Probe, fn: Any, *args: Any) -> Any:
        if probe.failed:
            return None
        try:
            result = fn(*args)
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            probe.fail(error)
            return None
        return True if result is None else result

    def _on_failure(self, probe: Probe, error: BaseException) -> None:
        self._warn(probe.name, error)
        try:
            probe.disarm()
        except Exception:  # noqa: BLE001,S110 - already failing; the warning has been given
            pass

    def _warn(self, what: str, error: BaseException) -> None:
        if what in self._warned:
            return
        self._warned.add(what)
        warnings.warn(f"gradmedic: the {what!r} probe failed ({type(error).__name__}: {error}) and was "
                      "switched off; your training step is unaffected.", GradmedicWarning, stacklevel=3)
