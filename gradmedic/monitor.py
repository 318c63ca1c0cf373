"""Monitor: attaches probes to a model, runs them on schedule, flushes their buffers into a Trace.

Hooks are registered only for the steps a probe is scheduled on (armed at the end of the previous
``step()``), so an unscheduled step runs the user's model with no gradmedic code in it at all.
Statistics stay on the model's device until a flush (every ``flush_every`` steps, on ``close()`` and
when ``.trace`` is read); a ``log_to`` sink receives them there too. A probe that raises is switched off
with one warning; the user's forward, backward and optimizer step go on as if it had never been there.
The same holds for the Monitor's own machinery: a trace that refuses a chunk or a probe that cannot be
disarmed costs a warning and that data, never the user's step, and ``close()`` takes every hook off
whatever failed before it.

A module added to the model after the Monitor was created is not measured (the probes index the
model once); the Monitor says so in one warning rather than leaving the gap silent.

Under ``torch.compile`` the hooks must not be traced: dynamo would inline them into the graph, guard on
them and recompile whenever they come and go. While hooks are armed the Monitor sets the compiler's
stance to ``force_eager``, so a scheduled step runs the model eagerly with the hooks and every other step
runs the compiled graph, which was compiled (once) without them. The model is read through its
wrappers (``_orig_mod``, DDP's ``module``), so layers carry the user's names.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradmedic._arguments import check_arguments
from gradmedic._budget import check_flush_every
from gradmedic._compile import EagerWhileArmed
from gradmedic._distributed import combiner_for
from gradmedic._errors import GradmedicError, GradmedicWarning, first_line
from gradmedic._first_look import ask_for_first_looks, run_meta
from gradmedic._lifecycle import NewModuleWatch, ParameterWatch, follow, release_when_dropped, weak_callback
from gradmedic._live import LiveFindings, ask_where_nans_come_from
from gradmedic._run_scalars import RunScalars
from gradmedic._sentinel import Sentinel
from gradmedic._sinks import as_sink, findings_text
from gradmedic.probes import LayerIndex, Probe, build_probes
from gradmedic.probes.base import Chunk, buffer_dtype
from gradmedic.trace import Trace

__all__ = ["Monitor"]


class Monitor:
    """Watch gradients through a training run.

    ``preset``: ``"cheap"`` (gradient norms every 50 steps), ``"standard"`` (default: gradients,
    backward signal, attention logits, output logits and Adam's state every 20 steps; activations, time steps and
    NaN/Inf every 100; the loss at every step) or ``"full"``
    (everything, every step). ``every`` overrides every probe's period; ``probes`` replaces the preset
    with probe instances of your own. ``log_to``: a TensorBoard ``SummaryWriter`` or a callable
    ``(step, metrics)`` (``wandb.log`` and ``mlflow.log_metrics`` work as they are) that receives the
    numbers at each flush.

    While it trains, each scheduled flush diagnoses the trace so far: a finding that is new or worse is said once
    (a ``GradmedicFindingWarning``, a text to ``log_to``, and ``on_finding(finding)``); ``live=False`` keeps quiet
    until ``diagnose()``. A NaN loss, a loss spike or a diverging loss flushes and diagnoses at the step it is seen
    (``gradmedic._sentinel``: no sync; on CUDA a step or two late). ``scaler``: a ``torch.amp.GradScaler``, whose
    scale is recorded at every step (a collapsing scale is how float16 overflow shows).

    Under ``torch.distributed`` (a process group of more than one rank) the Monitor is rank-aware:
    DDP / torch.compile wrappers are looked through (names carry no ``module.`` prefix), each flush
    combines every rank's numbers in one collective (``gradmedic._distributed``), and only
    rank 0's ``trace.save`` and ``log_to`` sink write (``rank_files=True``: every rank writes
    ``NAME.rankN.gmtrace``). Create the Monitor on every rank, and call ``close()`` on every rank:
    reading ``monitor.trace`` mid-run does not communicate and shows what was combined at the last flush.
    ``distributed=False`` keeps each rank's numbers local. There the loss sentinel is off: its early flush would be
    a collective on the one rank whose loss went bad, so findings wait for the scheduled flush.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 preset: str = "standard", every: int | None = None, probes: list[Probe] | None = None,
                 flush_every: int = 100, log_to: Any = None, distributed: bool | None = None,
                 rank_files: bool = False, on_finding: Any = None, live: bool = True, scaler: Any = None):
        check_arguments(model, optimizer, preset, every, flush_every, probes, distributed, on_finding)
        self.model = model
        self.optimizer = optimizer
        self.flush_every = flush_every
        self.sink = as_sink(log_to)
        self.preset = preset if probes is None else "custom"
        self.layers = LayerIndex(model)  # wrappers (compile, DDP, FSDP) looked through
        self.probes: list[Probe] = list(probes) if probes is not None else build_probes(preset, every)
        self._warned: set[str] = set()
        check_flush_every(flush_every, len(self.layers), [len(p.metrics) for p in self.probes],
                          buffer_dtype(self.layers.device))  # before the buffers are made: one line, not torch's
        for probe in self.probes:
            probe.on_failure = weak_callback(self._on_failure)  # hooks hold probes: never the Monitor
            probe.attach(self.layers, flush_every + 1)
            if optimizer is not None and hasattr(probe, "bind"):
                probe.bind(optimizer)  # the optimizer's state probe reads the user's optimizer, not the first to step
        self._run = RunScalars(self._warn)  # loss, learning rate and loss scale at every step
        self.scaler = scaler
        self._live = LiveFindings(on_finding) if live else None
        self._trace = Trace(run_meta(model, optimizer, self.layers, self.preset, self.probes, torch.__version__))
        self._combiner = combiner_for(self.layers, self.model, self._trace, distributed, rank_files)
        self._sentinel = Sentinel(self._warn) if self._combiner is None else None  # a loss gone bad: flush at once
        self._step = 0
        self._first_looks = ask_for_first_looks(self.probes)  # the first updates, said at once
        self._armed: list[Probe] = []
        self._recorded: set[int] = set()  # ids of probes that record_gradients() measured this step
        self._prepared: set[int] = set()  # ids of probes whose after_step() record_gradients() already ran
        self._eager = EagerWhileArmed()  # compiled code runs eagerly while hooks are armed
        self._closed = False
        self._paused = False  # inside paused(): no hook on the model
        self._module_watch = NewModuleWatch(self)  # a module added later: said once, not measured
        # parameters replaced later are followed (gradmedic._lifecycle); not under torch.distributed
        self._params_watch = ParameterWatch(self.layers) if self._combiner is None else None
        self._finaliser = release_when_dropped(self)  # dropped without close(): the hooks come off
        self._arm(0)

    # --- the user's loop ------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called."""
        return self._step

    @property
    def said(self) -> list:
        """The findings said while it trained, as (the step it was said at, the Finding), in order; empty with
        ``live=False``. A finding said mid-run may be gone at the end (a problem the run got over): this keeps it."""
        return list(self._live.history) if self._live is not None else []

    def gradients_due(self) -> bool:
        """Whether ``record_gradients()`` has work at the current step: a probe that reads ``.grad`` measures at it,
        or at the next (then the weights are snapshot here, before the optimizer's step). A framework callback arms
        its end-of-backward hook only then."""
        step = self._step
        return any(p.should_compute(step) or p.should_compute(step + 1) for p in self.probes if not p.uses_hooks)

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record this training step; call after ``loss.backward()``. ``loss`` is optional."""
        if self._closed:
            raise GradmedicError("Monitor.step() was called after close(); create a new Monitor to go on.")
        self._follow_parameters()
        step = self._step
        for probe in self.probes:
            if id(probe) in self._recorded:
                continue  # measured at the end of backward by record_gradients()
            if probe.should_compute(step) and (not probe.uses_hooks or probe in self._armed):
                self._safely(probe, probe.collect, step)
        self._recorded.clear()
        self._disarm(keep=step + 1)
        self._run.record(step, loss, self.optimizer, self.scaler)
        alarm = self._sentinel is not None and self._sentinel.see(step, loss)
        for probe in self.probes:
            if id(probe) not in self._prepared:
                self._safely(probe, probe.after_step, step, probe.should_compute(step + 1))
        self._prepared.clear()
        self._step += 1
        # on a fixed grid (an alarm's or a first look's flush does not move it): the same steps on every rank
        if self._step % self.flush_every == 0 or alarm or self._step in self._first_looks:
            self.flush()
            self._say_findings()
        if self.sink is not None and self._writes:
            self._to_sink(lambda sink: sink.tick())
        self._arm(self._step)

    def record_gradients(self) -> None:
        """Measure the parameter gradients now, for the current step, without ending it.

        For training loops that change gradients between backward and ``step()`` (a Trainer that clips
        them): call it at the end of each backward; the last call before ``step()`` is the one kept, so
        under gradient accumulation the recorded gradient is the accumulated one, before clipping.
        """
        if self._closed:
            return
        self._follow_parameters()
        step = self._step
        for probe in self.probes:
            if probe.uses_hooks or id(probe) in self._prepared:
                continue
            if probe.should_compute(step):
                if self._safely(probe, probe.collect, step):
                    self._recorded.add(id(probe))
            elif probe.should_compute(step + 1):
                # the next measured step will be collected here too, before the optimizer's step: a probe that
                # snapshots the weights for it (the update ratio) must take the snapshot at this point as well,
                # so that exactly one optimizer step lies between the two (after it, at step(), none would)
                self._safely(probe, probe.after_step, step, True)
                self._prepared.add(id(probe))

    @contextlib.contextmanager
    def paused(self) -> Iterator[Monitor]:
        """Forwards and backwards run inside are not measured: they are not this model's training step.

        Everything between two ``step()`` calls counts as one step (the micro-batches of gradient accumulation
        pool). A GAN's generator step runs a forward and a backward through the discriminator: a Monitor of the
        discriminator would pool them into its next step, mixing the generator's loss into the discriminator's
        backward signal and activations. Run the generator step inside ``monitor_d.paused()``. The hooks come
        off on entry and are put back on exit; gradients (read at ``step()``) are the user's business, as always.
        """
        if self._paused or self._closed:
            yield self
            return
        self._paused = True
        for probe in self._armed:
            probe.remove_hooks()  # never raises; the step's state so far is kept
        self._run_eagerly(False)
        try:
            yield self
        finally:
            self._paused = False
            if not self._closed:
                for probe in self._armed:
                    self._safely(probe, probe.arm)
                self._arm(self._step)

    def _arm(self, step: int) -> None:
        if self._paused:
            return  # paused(): armed on leaving it
        for probe in self.probes:
            if probe.uses_hooks and probe.should_compute(step) and probe not in self._armed:
                if self._safely(probe, probe.arm):
                    self._armed.append(probe)
        self._run_eagerly(bool(self._armed))

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
        self._run_eagerly(bool(self._armed) and not self._paused)  # paused(): no hook on the model, no stance

    def _run_eagerly(self, on: bool) -> None:
        """Keep torch.compile from tracing the hooks: compiled code runs eagerly while they are armed."""
        try:
            self._eager.hold(on)
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._warn("compile stance", error)

    # --- flushing and closing -------------------------------------------------------------------
    def flush(self) -> None:
        """Move every probe's device buffer into the trace (one device-to-host copy per probe), and
        hand the same numbers to the ``log_to`` sink.

        Under torch.distributed this is a collective: every rank must flush at the same point (the
        Monitor does so every ``flush_every`` steps and at ``close()``)."""
        chunks: dict[str, Chunk] = {}
        for i, probe in enumerate(self.probes):
            chunk = self._safely(probe, probe.flush)
            if isinstance(chunk, Chunk):
                chunks[f"{i}:{probe.name}"] = chunk
        try:
            chunk = self._run.drain()
            if chunk is not None:
                chunks["run"] = chunk
        except Exception as error:  # noqa: BLE001
            self._warn("run flush", error, what="recording the loss and learning rate", consequence="they were dropped")
        if self._combiner is not None:
            chunks = self._combiner.combine(chunks)  # one collective; this rank's own numbers if it fails
            self._trace.meta["distributed"] = self._combiner.describe()
        for chunk in chunks.values():
            self._record(chunk)
        # layers whose parameters were all frozen after the Monitor was built (requires_grad_(False) in the loop):
        # no gradient is meant to reach them (diagnosis.rules.no_gradient)
        self._trace.meta["frozen"] = [name for name, ps in zip(self.layers.names, self.layers.params, strict=True)
                                      if ps and not any(p.requires_grad for p in ps)]
        if self.sink is not None and chunks and self._writes:
            self._to_sink(lambda sink: sink.write(list(chunks.values())))
        if "run" in chunks and not self._closed:
            ask_where_nans_come_from(chunks["run"], self.probes, self._step)
        try:
            follow(self)  # every buffer is empty now: parameters replaced since are taken up
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._warn("parameters", error, what="following replaced parameters", consequence="they are not measured")

    def _follow_parameters(self) -> None:
        """Parameters were registered on a watched module since the last look: flush (which follows them) before
        measuring this step with the old ones. One attribute read per step otherwise."""
        if self._params_watch is not None and self._params_watch.changed:
            self.flush()

    def _say_findings(self) -> None:
        """Diagnose the trace so far and say what is new or worse (``_live``); rank 0 only under torch.distributed.
        A failure here costs the live findings (one warning), never the user's step."""
        if self._live is None or not self._writes:
            return
        try:
            fresh = self._live.update(self._trace, self._step - 1)
            if fresh and self.sink is not None:
                self._to_sink(lambda sink: sink.text("findings", findings_text(fresh), self._step - 1))
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._warn("live", error, what="diagnosing the run while it trains", consequence="findings are said "
                       "only at the end (monitor.diagnose())")

    @property
    def _writes(self) -> bool:
        """Whether this process writes files and logs: always, except ranks other than 0 under
        torch.distributed (unless ``rank_files=True``)."""
        return self._trace.rank_suffix != ""

    def _record(self, chunk: Chunk) -> None:
        try:
            self._trace.extend(chunk)
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            self._warn("trace", error, what="recording into the trace", consequence="these measurements were "
                       "dropped")

    def _to_sink(self, write: Any) -> None:
        """A sink that fails is switched off with one warning, like a probe."""
        try:
            write(self.sink)
        except Exception as error:  # noqa: BLE001 - a logger must never break training
            self.sink = None
            warnings.warn(f"gradmedic: writing to log_to failed ({type(error).__name__}: {first_line(error)}); "
                          "logging is switched off, the trace still records everything.", GradmedicWarning,
                          stacklevel=3)

    @property
    def trace(self) -> Trace:
        """The trace so far (reading it flushes what is still on the device; under torch.distributed it
        does not, since a flush is a collective: it holds what was combined at the last flush)."""
        if not self._closed and self._combiner is None:
            self.flush()
        return self._trace

    def close(self) -> None:
        """Flush and remove every hook; the model is left exactly as it was. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._finaliser.detach()
        try:
            self.flush()
        finally:  # whatever failed above, no hook of ours stays on the model
            self._disarm()
            for probe in self.probes:
                try:
                    probe.detach()
                except Exception as error:  # noqa: BLE001
                    self._warn(probe.name, error)
                    probe.remove_hooks()
            self._module_watch.remove()
            if self._params_watch is not None:
                self._params_watch.remove()
        if self.sink is not None and self._writes:
            self._to_sink(self._findings_to_sink)

    def _findings_to_sink(self, sink: Any) -> None:
        sink.text("findings", findings_text(self.diagnose().findings), max(self._step - 1, 0))
        sink.close()

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
        except Exception:  # noqa: BLE001 - already failing; the warning has been given
            probe.remove_hooks()

    def _warn(self, key: str, error: BaseException, what: str | None = None,
              consequence: str = "it was switched off") -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        what = what or f"the {key!r} probe"
        warnings.warn(f"gradmedic: {what} failed ({type(error).__name__}: {first_line(error)}) and {consequence}; "
                      "your training step is unaffected.", GradmedicWarning, stacklevel=3)
