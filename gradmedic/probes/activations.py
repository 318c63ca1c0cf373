"""Per-layer activation statistics: mean, std, saturated fraction, dead fraction.

Saturation (sigmoid/tanh/hardtanh/softsign/hardsigmoid family) is measured per element: the share of
outputs where the activation's derivative, computed from the output, is below SATURATED_DERIVATIVE of
its peak. Death (ReLU family) is measured per unit: a unit (feature/channel) is dead when its output is
zero for every sample and position in the batch, so no gradient reaches its incoming weights.

The feature axis is 1 for (B, C) and for channels-first conv maps (B, C, H, W), and the last axis for
(B, T, C) sequences. A 3-d tensor is ambiguous, so the layout is taken from the last parameterised
layer that ran before the activation: conv and batch-norm layers are channels-first, the rest
(Linear, LayerNorm, RNN, Embedding) channels-last.

A module called several times per forward accumulates over its calls; each call counts its own units,
since one activation module reused after two different layers is two sets of units. Functional
activations (``F.relu``, ``torch.sigmoid``, ``x.tanh()``) are seen through a ``TorchFunctionMode``
active only during a scheduled forward, and are booked under the layer whose units they are: the parameterised
layer that ran last inside the module whose ``forward`` called them (``torch.sigmoid(self.fc(x))`` under ``fc``), or
that module itself when none ran in it (a cell that multiplies its own parameters).
The mode is always taken off torch's stack again, also when the probe fails inside one of its calls.

Only training forwards count: a forward that builds no graph (``torch.no_grad()``, ``inference_mode``)
is not measured, and when a step saw forwards of the model in train mode, those of the model in eval mode
(a validation pass with gradients on) are left out of it too. A model trained in eval mode, or with a
frozen part kept in eval mode, is still measured. Under activation checkpointing a module's forward runs
again in the backward (``base.in_backward``): that repeat is measured only for a module whose forward was not
measured in the step (reentrant checkpointing runs the first one under ``no_grad``), so every call counts once.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradmedic._tensors import first_float_tensor, sum_of_squares
from gradmedic.probes._families import (
    CALLS_FUNCTIONAL,
    CHANNELS_FIRST,
    DEAD_FULL_SAMPLES,
    DEAD_MARGIN,
    SATURATED_DERIVATIVE,
    Family,
    FunctionalWatch,
    activation_family,
    alive_units,
    dead_margin,
    unit_bias,
    unit_scale,
)
from gradmedic.probes.base import LayerIndex, Probe, in_backward, is_torch_module

__all__ = ["DEAD_FULL_SAMPLES", "DEAD_MARGIN", "SATURATED_DERIVATIVE", "ActivationProbe", "activation_family"]

# An output that autograd keeps for the backward anyway (tanh, sigmoid and ReLU save their result: the grad_fn
# types below) is reduced late in the backward, once the backward has read it back into the cache (or at the
# collect, if the backward never reaches it), rather than in the forward hook between the model's own kernels,
# where each reduction paid about three times its isolated cost (cold code and data: a 64x256 tanh output's sum,
# dot and saturated count took ~38 us there against ~15 us alone). The full preset on width-256 tanh MLPs, in
# one process against the forward-hook code: depth 50 1.19 against 1.23, depth 10 1.25 against 1.26
# (BENCHMARKS.md). Held only while the step's held outputs stay under HOLD_BYTES and each under
# HOLD_TENSOR_BYTES: the fixed cost of a reduction is what the hold saves, and it matters for small tensors; a
# large one is reduced in the hook as before, so the memory held past its release in the backward stays a few
# MB whatever the model. Never under saved-tensor hooks (activation checkpointing, offloading): there autograd
# does not keep the output, and holding it would undo what the hooks save.
SAVES_OUTPUT = frozenset({"TanhBackward0", "SigmoidBackward0", "ReluBackward0"})
HOLD_BYTES = 8 << 20
HOLD_TENSOR_BYTES = 256 << 10
_SAVED_TENSOR_HOOKS: Callable[[bool], Any] = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks",
                                                     lambda _ignore: True)  # unknown: treat as present, hold nothing


class ActivationProbe(Probe):
    name = "activations"
    # dead_units_seen: how many units the dead fraction was read over (summed over a module's calls), so
    # that a rule can tell one dead unit of four from a quarter of a wide layer
    metrics = ("act_mean", "act_std", "saturated_frac", "dead_frac", "dead_units_seen")
    uses_hooks = True

    def __init__(self, every: int = 1, functional: bool = True):
        super().__init__(every)
        self.functional = functional

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._family = [activation_family(m) for m in layers.modules]
        # per call, in call order: the row and a few 0-d device tensors (one op each in the hook)
        self._calls: list[int] = []
        self._n: list[int] = []
        # 0-d tensors per call, stacked at collect: sum and sum of squares, saturated count (a float, tally; a
        # shared zero for a family that does not saturate). Two lists: the moments keep the output's precision
        self._moments: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []
        self._of: list[int] = []  # per call: elements the saturated count is out of (0: not a saturating family)
        self._no_count = torch.zeros((), device=self.device)
        self._nan = torch.full((), math.nan, device=self.device)  # a held output changed in place: not measured
        # outputs held for the collect (see SAVES_OUTPUT): (call, family, output, its version when held)
        self._held: list[tuple[int, Family, torch.Tensor, int]] = []
        self._held_bytes = 0
        self._need_anchor = True  # the next output held registers the hook that reduces them (_measure)
        self._unheld: set[int] = set()  # rows whose held output was changed in place once: reduced in the hook
        self._training: list[bool] = []  # per call: ran in train mode (eval calls are dropped when mixed)
        self._dead: list[tuple[int, int, torch.Tensor, int]] = []  # (call, row, alive units, units)
        self._forward_rows: set[int] = set()  # rows measured outside a backward this step (see in_backward)
        self._stack: list[nn.Module] = []  # user-defined modules running now (functional attribution)
        self._started: list[int] = []  # per module in _stack, the count of layers finished when it started
        self._finished = 0  # parameterised layers finished in this forward (their hook ran)
        self._last_layer: nn.Module | None = None  # the last of them
        self._inside_activation = 0
        self._channels_first = False
        self._watch: FunctionalWatch | None = None
        self._pre_input: torch.Tensor | None = None
        # the last parameterised layer, its input and output (weak: never kept alive), so that a dead-unit test whose
        # pre-activation is that output has the scale the layer's weights give its input (unit_scale)
        self._made: tuple[nn.Module, weakref.ref, weakref.ref] | None = None
        self._pending_exit: Any = None  # handle of a hook that takes a watch off the stack after a failure

    def _watches_functional(self) -> bool:
        """Whether a functional activation can be seen: some module runs code we do not know (see arm)."""
        assert self.layers is not None
        return self.functional and any(not is_torch_module(m) or isinstance(m, CALLS_FUNCTIONAL)
                                       for m in self.layers.modules)

    def arm(self) -> None:
        assert self.layers is not None
        watch = self._watches_functional()
        # only the dead-unit test of a dying activation reads the layout that _note_layout follows, and only
        # an in-place activation or a functional watch needs _enter_activation: a model with neither (a tanh
        # MLP) pays for no such hook
        layout = watch or any(f is not None and f.dies for f in self._family)
        # each forward of the model anchors its own held outputs (one without a backward leaves its own unreduced)
        self._handles.append(self.layers.modules[0].register_forward_pre_hook(self.guard(self._new_forward)))
        for row, module in enumerate(self.layers.modules):
            family = self._family[row]
            if family is not None:
                if watch or getattr(module, "inplace", False):
                    self._handles.append(module.register_forward_pre_hook(self.guard(self._enter_activation)))
                self._handles.append(module.register_forward_hook(self.guard(self._on_module, row, family),
                                                                  always_call=True))
            elif layout and self.layers.owns_params[row]:
                self._handles.append(module.register_forward_hook(self.guard(self._note_layout, module)))
            # torch.nn's own modules call no activation function that is not already seen as a module,
            # except the transformer layers (their activation is F.relu/F.gelu by default): watched too,
            # so that their calls are booked under the layer, not the root or nothing
            if self.functional and family is None and (not is_torch_module(module) or
                                                       isinstance(module, CALLS_FUNCTIONAL)):
                self._handles.append(module.register_forward_pre_hook(self.guard(self._enter, module)))
                self._handles.append(
                    module.register_forward_hook(self.guard(self._leave, module), always_call=True))

    def remove_hooks(self) -> None:
        super().remove_hooks()
        try:
            self._stop_watch()
        except Exception:  # noqa: BLE001,S110 - remove_hooks never raises
            self._watch = None

    def reset(self) -> None:
        super().reset()
        self._stop_watch()
        self._stack.clear()
        self._started.clear()
        self._finished, self._last_layer, self._made = 0, None, None
        self._inside_activation = 0
        self._reset()

    def _reset(self) -> None:
        for store in (self._calls, self._n, self._moments, self._counts, self._of, self._training, self._dead,
                      self._forward_rows, self._held):
            store.clear()
        self._held_bytes = 0
        self._need_anchor = True

    # --- which module is running ------------------------------------------------------------------
    def _new_forward(self, _module: nn.Module, _args: Any) -> None:
        self._need_anchor = True

    def _note_layout(self, module: nn.Module, _module: nn.Module, args: Any, output: Any) -> None:
        self._channels_first = isinstance(module, CHANNELS_FIRST)
        self._finished += 1
        self._last_layer = module
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._made = ((module, weakref.ref(first), weakref.ref(output))
                      if first is not None and isinstance(output, torch.Tensor) else None)

    def _maker(self, pre: Any, out: Any) -> tuple[nn.Module, Any] | None:
        """The layer that made the pre-activation and its input, when that is the last parameterised layer's very
        output: ``pre`` itself, or for an in-place activation (whose ``pre`` is a copy) its output."""
        made = self._made[2]() if self._made is not None else None
        if made is None or (pre is not made and out is not made):
            return None
        return self._made[0], self._made[1]()

    def _enter_activation(self, module: nn.Module, args: Any) -> None:
        self._inside_activation += 1
        if getattr(module, "inplace", False) and args and isinstance(args[0], torch.Tensor):
            self._pre_input = args[0].detach().clone()  # the in-place op overwrites the pre-activation

    def _enter(self, module: nn.Module, _module: nn.Module, args: Any) -> None:
        if not self._stack and self._watch is None and torch.is_grad_enabled():
            self._watch = FunctionalWatch(self.guard(self._on_functional))
            self._watch.__enter__()
        self._stack.append(module)
        self._started.append(self._finished)

    def _leave(self, module: nn.Module, _module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
            self._started.pop()
        if not self._stack:
            self._stop_watch()

    def _stop_watch(self) -> None:
        if self._watch is None:
            return
        watch, self._watch = self._watch, None
        if not watch.inside:
            watch.__exit__(None, None, None)
        elif self._stack and self._pending_exit is None:
            # stopped from inside the mode's own handler (the probe failed there): the mode goes back on
            # the stack when the handler returns, so take it off when the outermost watched forward ends,
            # where it would have been taken off anyway (inert until then: a failed probe measures nothing)
            def leave(*_: Any) -> None:
                self._pending_exit.remove()
                self._pending_exit = None
                try:
                    watch.__exit__(None, None, None)
                except Exception:  # noqa: BLE001,S110 - already failed and reported; never reach the user
                    pass

            self._pending_exit = self._stack[0].register_forward_hook(leave, always_call=True)

    # --- measurement ------------------------------------------------------------------------------
    def _on_module(self, row: int, family: Family, module: nn.Module, args: Any, output: Any) -> None:
        self._inside_activation = max(self._inside_activation - 1, 0)
        out = first_float_tensor(output)
        pre, self._pre_input = self._pre_input, None
        if pre is None and family.dies and not getattr(module, "inplace", False):
            pre = first_float_tensor(args)  # only the dead-unit test reads the pre-activation
        if out is not None and torch.is_grad_enabled():  # no graph, no training step
            self._measure(row, family, out, self._model_training(), pre, self._maker(pre, out))

    def _on_functional(self, family: Family, output: Any, pre: Any) -> None:
        if not self._stack or self._inside_activation or self.layers is None:
            return  # inside nn.ReLU etc.: measured as a module already
        out = first_float_tensor(output)
        if out is not None and torch.is_grad_enabled():
            # the units are those of the layer that ran last inside the calling module (``torch.sigmoid(self.fc(x))``
            # is fc's), or the calling module's own when none did (a cell that multiplies its own parameters)
            caller = self._stack[-1]
            layer = self._last_layer if self._finished > self._started[-1] else caller
            pre = first_float_tensor(pre)
            self._measure(self.layers.row.get(id(layer), self.layers.row[id(caller)]), family, out,
                          self._model_training(), pre, self._maker(pre, out))

    def _model_training(self) -> bool:
        """The whole model's mode, not the activation's: a validation pass sets model.eval(), while a frozen
        part kept in eval mode inside a training model is still part of the training step."""
        return self.layers is not None and self.layers.modules[0].training

    def _measure(self, row: int, family: Family, y: torch.Tensor, training: bool,
                 pre: torch.Tensor | None = None, maker: tuple[nn.Module, Any] | None = None) -> None:
        recomputed = in_backward()
        if recomputed:
            if row in self._forward_rows:
                return  # a checkpointed module recomputed: its first forward was measured already
        else:
            self._forward_rows.add(row)
        out, node = y, y.grad_fn  # what made the output (does autograd keep it? see SAVES_OUTPUT)
        if y.requires_grad:
            y = y.detach()
        if y.dtype.itemsize < 4:
            y, node = y.float(), None
        n = y.numel()
        if n == 0:
            return
        call = len(self._calls)
        self._calls.append(row)
        self._n.append(n)
        self._training.append(training)
        saturates = family.saturated is not None
        self._of.append(n if saturates else 0)
        size = n * y.element_size()
        self._moments += (self._nan, self._nan)  # this call's places, filled by _reduce (NaN: not measured)
        self._counts.append(self._nan)
        if (size <= HOLD_TENSOR_BYTES and self._held_bytes + size <= HOLD_BYTES and row not in self._unheld
                and not recomputed and type(node).__name__ in SAVES_OUTPUT and _SAVED_TENSOR_HOOKS(False) is None):
            if self._need_anchor:
                # the first output held in this forward: its node runs near the end of the forward's backward, when
                # the outputs of the layers after it have been read back; they are reduced there (and what is left,
                # an output the backward never reached, at the collect), so that monitor.step() does not grow
                self.on_gradient(out, self._reduce_in_backward)
                self._need_anchor = False
            self._held.append((call, family, y, y._version))
            self._held_bytes += size
        else:
            self._reduce(call, family, y)
        if family.dies and y.dim() >= 2:
            axis = 1 if (y.dim() == 2 or self._channels_first) else y.dim() - 1
            samples = n // y.shape[axis]
            # without the pre-activation the test is "off for every input seen", which needs many inputs
            if samples >= DEAD_FULL_SAMPLES or (pre is not None and pre.shape == y.shape):
                others = tuple(d for d in range(y.dim()) if d != axis)
                scale, bias = ((unit_scale(maker[0], maker[1], y.shape[axis]), unit_bias(maker[0], y.shape[axis]))
                               if maker is not None else (None, None))
                self._dead.append((call, row, alive_units(y, pre, others, dead_margin(samples), scale, bias),
                                   y.shape[axis]))

    def _reduce(self, call: int, family: Family, y: torch.Tensor) -> None:
        """The sums and the saturated count of one call's (detached) output, into that call's places."""
        # sum and sum of squares are the fastest full reductions (~5-8 us each on 128x512); var_mean is
        # ~20x slower
        self._moments[2 * call:2 * call + 2] = (y.sum(), sum_of_squares(y))
        self._counts[call] = family.saturated(y) if family.saturated is not None else self._no_count

    def _reduce_in_backward(self, _grad: torch.Tensor) -> None:
        self._reduce_held()

    def _reduce_held(self) -> None:
        """Reduce the outputs held for the collect into their calls' places. One changed in place since its forward
        (possible only where no backward read it) is not measured at this step, and its row is reduced in the hook
        from then on."""
        held, self._held, self._held_bytes, self._need_anchor = self._held, [], 0, True
        for call, family, y, version in held:
            if y._version != version:
                self._unheld.add(self._calls[call])
                continue
            self._reduce(call, family, y)

    def _drop_eval_calls(self) -> None:
        """When the step had train-mode forwards, forget the eval-mode ones (a validation pass)."""
        if all(self._training) or not any(self._training):
            return
        keep = [i for i, t in enumerate(self._training) if t]
        renumber = {old: new for new, old in enumerate(keep)}
        self._calls[:] = [self._calls[i] for i in keep]
        self._n[:] = [self._n[i] for i in keep]
        self._of[:] = [self._of[i] for i in keep]
        self._moments[:] = [t for i in keep for t in self._moments[2 * i:2 * i + 2]]
        self._counts[:] = [self._counts[i] for i in keep]
        self._training[:] = [True] * len(keep)
        self._dead[:] = [(renumber[c], r, v, k) for c, r, v, k in self._dead if c in renumber]

    def collect(self, step: int) -> None:
        """Keep the step's per-call sums and counts (two or three stacks) and its layout; ``finish`` reduces them
        at the flush."""
        self._reduce_held()
        self._drop_eval_calls()
        if not self._calls:
            return
        dead = tuple((row, units) for _, row, _, units in self._dead)
        kept = [torch.stack(self._moments), torch.stack(self._counts)]
        if dead:
            kept.append(torch.stack([alive for _, _, alive, _ in self._dead]))
        self.defer(self.buffer.open(step), (tuple(self._calls), tuple(self._n), tuple(self._of), dead), *kept)
        self._reset()

    def finish(self, layout: tuple[tuple[Any, ...], ...], slots: torch.Tensor, moments: torch.Tensor,
               counts: torch.Tensor, alive: torch.Tensor | None = None) -> None:
        calls, n, of, dead = layout
        steps, size, dev, dt, c = len(moments), len(self._family), self.device, self.dtype, len(calls)
        # per call (columns): elements, saturable elements, sum, sum of squares, saturated count; pooled by row
        per_call = torch.cat([self.host_tensor([*n, *of], dt).view(1, 2, c).expand(steps, 2, c),
                              moments.view(steps, c, 2).transpose(1, 2).to(dt),
                              counts.to(dt).view(steps, 1, c)], dim=1)
        pooled = torch.zeros(steps, 5, size, dtype=dt, device=dev).index_add_(
            2, self.host_tensor(calls, torch.long), per_call)
        seen = sorted(set(calls))
        total, of_, first, second, saturated = pooled.index_select(2, self.host_tensor(seen, torch.long)).unbind(1)
        mean = first / total
        std = (second / total - mean.square()).clamp_min_(0).sqrt_()
        # 0/0 = NaN (not measured) for a row with no saturating family; hardshrink passes a NaN on, so a NaN
        # output would count as saturated (see _beyond): a row whose outputs held NaN/Inf this step has no
        # saturated share (its moments show it)
        share = torch.where(first.isfinite(), saturated / of_, math.nan)
        where = self.cells(("act_mean", seen), ("act_std", seen), ("saturated_frac", seen))
        self.buffer.put_steps(slots, where, torch.cat([mean, std, share], dim=1))
        if dead:
            assert alive is not None
            rows = [r for r, _ in dead]
            units = self.host_tensor([k for _, k in dead], dt).expand(steps, -1)
            count = torch.zeros(steps, 2, size, dtype=dt, device=dev).index_add_(
                2, self.host_tensor(rows, torch.long), torch.stack([units - alive.to(dt), units], dim=1))
            picked = sorted(set(rows))
            dead_units, out_of = count.index_select(2, self.host_tensor(picked, torch.long)).unbind(1)
            where = self.cells(("dead_frac", picked), ("dead_units_seen", picked))
            self.buffer.put_steps(slots, where, torch.cat([dead_units / out_of, out_of], dim=1))
