"""What every probe shares: the model's layer index, a schedule, a device buffer and guarded hooks.

A probe measures one family of statistics. The Monitor drives it through a fixed life cycle:

    attach(ctx)   once: allocate buffers on the model's device
    arm()         before a scheduled step's forward: register hooks (hook-based probes only)
    collect(step) after that step's backward: keep what the hooks saw (a few stacked device tensors)
    disarm()      remove the hooks again, so unscheduled steps pay nothing (reset() alone when the
                  probe is due at the next step too: the hooks stay, only the step's state goes)
    flush()       reduce the kept steps into the buffer (``settle``) and move it to the host as a
                  Chunk (the only device-to-host copy)
    detach()      free everything

Everything between two flushes stays on the device: no ``.item()``, no ``.cpu()``, no Python branch
on a tensor value, and no tensor made from host data at each step (on CUDA a copy from the host blocks
like a read does): the small index and count tensors a collect needs come from ``host_tensor``, built
once per distinct value and reused at every step that has the same layout. Any exception inside a hook
or a collect is caught by ``guard`` and reported to the Monitor, which switches the probe off; the user's
forward and backward never see it.

A collect does as little as it can: most of a step's reduction (folding per-call sums into per-layer rows,
dividing, writing into the buffer) is a dozen kernels on tensors of a few dozen numbers, and on a CPU each
costs 5-20 us inside a training step (cold caches between the model's own kernels), more than the
arithmetic. So a probe ``defer``s the raw per-call results of a step and its host-side layout (rows, element
counts: a hashable key), and ``settle`` (at the flush) stacks the steps of each layout and reduces them
together with the same kernels, once per layout instead of once per step.

Activation checkpointing (``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable``) runs a
checkpointed module's forward a second time inside the backward, with its forward hooks. ``in_backward`` tells
a forward hook that it is such a recomputation: the non-reentrant kind (the default) ran the first forward
with gradients on, so a probe that measured it skips the repeat; the reentrant kind ran it under
``no_grad``, so the recomputation is the only forward with a graph, and is measured.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from gradmedic import architecture
from gradmedic._errors import bad_argument
from gradmedic.probes.buffer import Chunk, StepBuffer, buffer_dtype, to_device

__all__ = ["Chunk", "LayerIndex", "Probe", "StepBuffer", "buffer_dtype", "in_backward", "is_torch_module", "to_device"]

# distinct host-value tensors a probe keeps (Probe.host_tensor): a model with a fixed layout needs a few;
# one whose shapes change at every step (variable sequence lengths) would otherwise grow it without end
HOST_TENSOR_CACHE = 256


class LayerIndex:
    """Every module of a model by qualified name, and the parameters each one owns.

    A parameter shared by several modules (tied weights) belongs to the first owner in
    ``named_modules`` order, so per-layer norms add up to the model's norm without double counting.
    Names are the user's model's own: wrappers (torch.compile, DDP, FSDP) are taken off and their
    prefixes (``_orig_mod.``, ``module.``) never appear (``gradmedic.architecture``). ``roles`` gives each
    module's role in the model (activation, norm, block, attn_q, ...), from the same table.
    """

    def __init__(self, model: nn.Module):
        model = architecture.unwrap(model)
        self.names: list[str] = []
        self.modules: list[nn.Module] = []
        self.row: dict[int, int] = {}  # id(module) -> row
        self.params: list[list[nn.Parameter]] = []  # trainable parameters first owned by each module
        self.owns_params: list[bool] = []  # owns any parameter (trainable or frozen) directly
        seen: set[int] = set()
        parts = architecture.parametrization_parts(model)
        for name, module in model.named_modules():
            if type(module).__name__ in architecture.WRAPPER_TYPES:
                continue  # a compiled/wrapped submodule: its inner module stands for it under the same name
            if id(module) in parts:
                continue  # a weight's parametrization (weight norm): its parameters are the layer's own
            name = architecture.clean_name(name)
            self.row[id(module)] = len(self.names)
            self.names.append(name)
            self.modules.append(module)
            owned = []
            direct = architecture.own_parameters(module)
            for p in direct:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    owned.append(p)
            self.params.append(owned)
            self.owns_params.append(bool(direct))
        self.roles: dict[str, str] = architecture.roles(model)
        params = [p for ps in self.params for p in ps]
        first = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.param_dtype = params[0].dtype if params else torch.float32
        # set (for good) by a probe that sees a layer output in float16/bfloat16 while the weights are float32,
        # i.e. autocast: the backward then runs in 16 bits, and the gradient probe starts counting zeros
        self.low_precision_seen = False

    def __len__(self) -> int:
        return len(self.names)

    def rows_owning_params(self) -> list[int]:
        return [i for i, owns in enumerate(self.owns_params) if owns]


_GRAPH_TASK_ID: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def in_backward() -> bool:
    """Whether autograd is running a backward on this thread: a module forward that runs now is a checkpointed
    module being recomputed (see the module docstring). Reads the graph task's id, -1 outside a backward
    (torch's own checkpoint code reads the same); a torch without it counts as never."""
    return _GRAPH_TASK_ID() != -1


def is_torch_module(module: nn.Module) -> bool:
    """A module class of torch.nn's own (whose forward we know), not one a user defined."""
    return type(module).__module__.startswith("torch.nn.")


class Probe:
    """Base class: a schedule owned here, the statistics owned by the subclass."""

    name: ClassVar[str] = "probe"
    metrics: ClassVar[tuple[str, ...]] = ()  # the per-layer metrics it writes: the names the rules may read
    series: ClassVar[tuple[str, ...]] = ()  # the per-layer series (one value per time step) it writes
    uses_hooks: ClassVar[bool] = False  # needs arm()/disarm() around a scheduled step

    def __init__(self, every: int = 1):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise bad_argument("every", "a positive int (measure every k-th step)", every)
        self.every = every
        self._also: set[int] = set()  # steps measured besides the schedule (also_at)
        self.failed = False
        self.on_failure: Callable[[Probe, BaseException], None] | None = None
        self._handles: list[Any] = []
        self._generation = 0  # bumped by reset(): hooks bound to an older step's graph go quiet
        self.layers: LayerIndex | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every})"

    # --- schedule -------------------------------------------------------------------------------
    def should_compute(self, step: int) -> bool:
        return not self.failed and (step % self.every == 0 or step in self._also)

    def also_at(self, step: int) -> None:
        """Measure at ``step`` too, off the schedule: the Monitor asks the NaN/Inf probe for the step after a
        non-finite loss was seen, so that it says where the NaN comes from without waiting for its period."""
        self._also = {s for s in self._also if s >= step} | {step}

    # --- life cycle (subclasses extend) ---------------------------------------------------------
    def attach(self, layers: LayerIndex, capacity: int) -> None:
        self.layers = layers
        self.device = layers.device
        self.dtype = buffer_dtype(layers.device)
        self.buffer = StepBuffer(capacity, layers.names, self.metrics, self.device, self.dtype)
        self._host_tensors: dict[tuple[Any, ...], torch.Tensor] = {}
        # deferred steps (see the module docstring): layout -> (slots, per slot a tuple of device tensors)
        self._pending: dict[Hashable, tuple[list[int], list[tuple[torch.Tensor, ...]]]] = {}
        self._pending_slots: dict[int, Hashable] = {}  # slot -> its layout in _pending

    def host_tensor(self, values: Sequence[int | float], dtype: torch.dtype) -> torch.Tensor:
        """``values`` (host numbers: rows, element counts) as a tensor on the model's device, made once.

        A collect needs the same few index and count vectors at every step (the layout of a model's calls
        repeats); building them from Python lists each time would be a blocking host-to-device copy per
        step on CUDA. The tensors returned are shared between steps: read them, never write into them.
        """
        key = (dtype, *values)
        cached = self._host_tensors.get(key)
        if cached is None:
            if len(self._host_tensors) >= HOST_TENSOR_CACHE:
                self._host_tensors.clear()
            cached = self._host_tensors[key] = to_device(list(values), dtype, self.device)
        return cached

    def cells(self, *columns: tuple[str, Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) index tensors for ``StepBuffer.put_steps``: for each (metric, rows) in turn, those rows
        of that metric's column; made once per distinct layout (``host_tensor``)."""
        rows = [r for _, rs in columns for r in rs]
        cols = [self.buffer.col[metric] for metric, rs in columns for _ in rs]
        return self.host_tensor(rows, torch.long), self.host_tensor(cols, torch.long)

    def defer(self, slot: int, layout: Hashable, *tensors: torch.Tensor) -> None:
        """Keep a step's raw results for ``settle``: ``tensors`` (device tensors of the same shapes at every step of
        this ``layout``) and ``layout``, a hashable key holding every host value that ``finish`` needs.

        A slot deferred again (``Monitor.record_gradients`` at each backward of an accumulated step) replaces its
        earlier entry, as a later immediate write would overwrite an earlier one: the later entry must write every
        cell the earlier one did, or the probe ``settle``s first (the gradient probe, when a parameter has lost
        its gradient within the step). Nothing is computed here."""
        earlier = self._pending_slots.get(slot)
        if earlier is not None:
            slots, items = self._pending[earlier]
            i = slots.index(slot)
            del slots[i], items[i]
            if not slots:
                del self._pending[earlier]
        slots, items = self._pending.setdefault(layout, ([], []))
        slots.append(slot)
        items.append(tensors)
        self._pending_slots[slot] = layout

    def settle(self) -> None:
        """Reduce every deferred step into the buffer: per layout, its steps' tensors stacked and one ``finish``.
        Runs at the flush, where host copies are allowed: the slot indices are made here, and not cached (they
        differ from flush to flush and would crowd out the index tensors that steps reuse)."""
        pending, self._pending = self._pending, {}
        self._pending_slots = {}
        for layout, (slots, items) in pending.items():
            stacked = [torch.stack(parts) for parts in zip(*items, strict=True)]
            self.finish(layout, to_device(slots, torch.long, self.device), *stacked)

    def finish(self, layout: Hashable, slots: torch.Tensor, *stacked: torch.Tensor) -> None:
        """Write the deferred steps of one ``layout`` into ``slots``: each of ``stacked`` is the ``defer``red tensor
        with a leading dimension of one entry per slot. Probes that defer implement it."""
        raise NotImplementedError(f"{type(self).__name__} defers steps but has no finish()")

    def arm(self) -> None:
        """Register the hooks that watch one forward/backward."""

    def disarm(self) -> None:
        self.remove_hooks()
        self.reset()

    def remove_hooks(self) -> None:
        """Take every hook off the model. Never raises: the Monitor falls back on it when a disarm() fails,
        so that a broken probe cannot leave hooks behind."""
        handles, self._handles = self._handles, []
        for handle in handles:
            try:
                handle.remove()
            except Exception:  # noqa: BLE001,S110 - removing the others matters more
                pass

    def reset(self) -> None:
        """Forget this step's partial state; hooks from an earlier step's graph are ignored after it.
        The Monitor calls it instead of disarm() + arm() when the probe is due again at the next step.
        Subclasses that keep per-step state extend it."""
        self._generation += 1

    def gradient_inputs(self) -> list[torch.Tensor]:
        """Tensors of the current step whose gradient this probe's hooks read and that no parameter's gradient
        needs (a model's input, made a leaf or a view of the user's leaf). ``loss.backward()`` computes them;
        ``torch.autograd.grad`` over the parameters (``gm.check``) computes only what the parameters need, so it
        asks for these too."""
        return []

    def collect(self, step: int) -> None:
        """Reduce what was seen for ``step`` into the buffer, on the device."""

    def after_step(self, step: int, next_scheduled: bool) -> None:
        """Called after every Monitor step, scheduled or not (two-step statistics use it)."""

    def flush(self) -> Chunk | None:
        self.settle()
        return self.buffer.drain()

    def detach(self) -> None:
        self.disarm()

    # --- failure isolation ----------------------------------------------------------------------
    def fail(self, error: BaseException) -> None:
        if self.failed:
            return
        self.failed = True
        if self.on_failure is not None:
            self.on_failure(self, error)

    def step_guard(self, fn: Callable[..., Any], *bound: Any) -> Callable[..., None]:
        """``guard`` for a tensor hook registered during a step: it does nothing if it fires after the
        step was collected (a graph kept alive past ``Monitor.step()``).

        It is made once per hooked tensor per measured step, so it is one plain closure (no
        ``functools.wraps``, no second wrapper): at depth 50 the wrapped version cost ~0.4 ms a step."""
        generation = self._generation

        def hook(*args: Any) -> None:
            if self.failed or generation != self._generation:
                return None
            try:
                fn(*bound, *args)
            except Exception as error:  # noqa: BLE001 - a monitor must never break training
                self.fail(error)
            return None

        return hook

    def on_gradient(self, t: torch.Tensor, fn: Callable[..., Any], *bound: Any) -> None:
        """Call ``fn(*bound, dL/dt)`` when the backward has it, during this step only (``step_guard``'s rules).

        A pre-hook of the node that made ``t`` (``t.grad_fn``) gets the gradient of each of the node's outputs; it
        picks ``t``'s (``output_nr``) and does nothing when ``t`` got none. That is the gradient a tensor hook
        (``t.register_hook``) gets, also when ``t`` is changed in place later (the node is the one ``t`` has
        now), for less: ``Tensor.register_hook`` is Python that keeps a dict of hooks and a handle per tensor
        (the backward-signal probe alone: 409 against 330 us a step at depth 10, BENCHMARKS.md). A leaf, which
        has no node, gets a tensor hook."""
        generation = self._generation
        node = t.grad_fn
        # t's place among the node's outputs; -1 for a leaf's tensor hook, which gets the gradient itself. The hook
        # holds no reference to the node: the node holds the hook, and a cycle would keep the graph alive
        index = t.output_nr if node is not None else -1

        def hook(grads: Any) -> None:
            if self.failed or generation != self._generation:
                return None
            grad = grads[index] if index >= 0 else grads
            if grad is None:
                return None
            try:
                fn(*bound, grad)
            except Exception as error:  # noqa: BLE001 - a monitor must never break training
                self.fail(error)
            return None

        if node is None:
            t.register_hook(hook)
        else:
            node.register_prehook(hook)

    def guard(self, fn: Callable[..., Any], *bound: Any) -> Callable[..., None]:
        """Wrap a hook so that an exception switches the probe off instead of reaching the user."""

        @functools.wraps(fn)
        def hook(*args: Any) -> None:  # torch passes a hook's arguments positionally (with_kwargs too)
            if self.failed:
                return None
            try:
                fn(*bound, *args)
            except Exception as error:  # noqa: BLE001 - a monitor must never break training
                self.fail(error)
            return None

        return hook
