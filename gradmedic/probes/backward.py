"""The backward signal: RMS of dL/d(output) of each layer, the quantity that vanishes or explodes.

Parameter gradients mix the backward signal with the layer's input scale; the gradient with respect
to a layer's *output* is the signal itself (Nielsen's delta_l), so its profile across depth is what
shows vanishing or exploding gradients.

It is taken with a hook on the output's autograd node registered in a forward hook (``Probe.on_gradient``: what
a tensor hook on the output would get), not with ``register_full_backward_hook``: the latter wraps the output
in a BackwardHookFunction and then refuses a following in-place op (``ReLU(inplace=True)``). A hook on the node
the output had before an in-place op receives the gradient with respect to the value before it, which is the
pre-activation here. An output that gets no gradient (the unused first output of a module) is skipped.
A module called several times per forward accumulates: RMS over all its calls' elements.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic._tensors import first_float_tensor, sum_of_squares
from gradmedic.probes.base import LayerIndex, Probe

__all__ = ["BackwardSignalProbe"]


# nodes of an addition or subtraction: the residual connection x + f(x) (in place too: ``x += f(x)``)
_ADDITIONS = frozenset({"AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1"})
GRAPH_LIMIT = 4096  # autograd nodes looked at per block, once: a block's own graph has tens to a few hundred


def has_addition(x: torch.Tensor | None, out: torch.Tensor) -> bool | None:
    """Whether the autograd graph from ``out`` back to ``x`` (a block's output and input) holds an addition: a
    residual block adds its input back (``x + f(x)``); a plain stack of layers (conv, norm, activation) has none,
    biases being part of their layers' own nodes. None when it cannot be told: ``x`` has no graph (the data), or
    the graph is larger than GRAPH_LIMIT nodes. An addition elsewhere in the block (a mask added to attention
    scores) also reads as a skip: a plain block is told apart only when it holds no addition at all."""
    if x is None or not x.requires_grad or out.grad_fn is None:
        return None
    if x is out or x.grad_fn is out.grad_fn:  # changed in place: x += f(x) leaves the addition as both's node
        return True if type(out.grad_fn).__name__ in _ADDITIONS else None
    stop = x.grad_fn  # a leaf input (no node): the walk ends at the graph's leaves
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node is stop or node in seen:
            continue
        if type(node).__name__ in _ADDITIONS:
            return True
        seen.add(node)
        if len(seen) > GRAPH_LIMIT:
            return None
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class BackwardSignalProbe(Probe):
    name = "backward"
    # backward_rms: RMS per element; backward_norm: the whole tensor's norm (summed over a module's calls);
    # forward_index: the order in which layers first ran in this forward (depth order, whatever the
    # order of definition)
    # low_precision_out: 1 where the layer's output is float16/bfloat16 (a half model, or autocast with
    # float32 weights: the backward then runs in 16 bits and can underflow although the weights cannot)
    # skip_path: 1 where a residual block's output is reached from its input through an addition (x + f(x)), 0
    # where the block's graph holds none (a user's conv-BN-ReLU "Block": no residual stream), read once per block
    metrics = ("backward_rms", "backward_norm", "forward_index", "low_precision_out", "skip_path")
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        # parameterised layers, and the residual blocks: a block's output gradient is the residual stream,
        # the path the gradient takes through depth (gradmedic.architecture.stream_blocks); and the norms, also
        # those without parameters (OLMo's LayerNorm), whose place in the forward order says pre-LN or post-LN
        # (rules.norm_placement)
        kept = {i for i, name in enumerate(layers.names) if layers.roles.get(name) in ("block", "norm")}
        self._rows = sorted(set(layers.rows_owning_params()) | kept)
        self._squares: list[torch.Tensor] = []  # one 0-d sum of squares per hook call: one op in the hook
        self._calls: list[int] = []  # the row of each call
        self._count = [0] * len(layers)  # elements seen per row (host ints)
        self._order: dict[int, int] = {}  # row -> position of its first call in this forward
        self._low: set[int] = set()  # rows whose output was 16-bit in this forward
        self._blocks = {i for i, name in enumerate(layers.names) if layers.roles.get(name) == "block"}
        self._skip: dict[int, bool] = {}  # block row -> has a skip path (read at its first call with a graph)
        self._previous_block: tuple[int, Any] | None = None  # the last block's row and output node, this forward
        self._untold: set[int] = set()  # block rows whose own graph could not tell (has_addition gave None)

    def arm(self) -> None:
        assert self.layers is not None
        for row in self._rows:
            module = self.layers.modules[row]
            self._handles.append(module.register_forward_hook(self.guard(self._on_forward, row)))

    def _on_forward(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        self._order.setdefault(row, len(self._order))
        out = first_float_tensor(output)
        if out is not None and out.dtype in (torch.float16, torch.bfloat16):
            self._low.add(row)
            self.layers.low_precision_seen = True  # type: ignore[union-attr] - tells GradientProbe(zero_fraction="auto")
        if out is None or not out.requires_grad:
            return
        if row in self._blocks:
            self._read_skip(row, first_float_tensor(args), out)
        self.on_gradient(out, self._on_grad, row)

    def _read_skip(self, row: int, x: torch.Tensor | None, out: torch.Tensor) -> None:
        """Whether block ``row`` adds its input back: inside it (``has_addition``, once), or in the module that calls
        it (``x = x + block(x)``: the next block's input is an addition of this block's output)."""
        previous, self._previous_block = self._previous_block, (row, out.grad_fn)
        if previous is not None and self._skip.get(previous[0]) is not True and x is not None:
            node = x.grad_fn  # read until found: then a block costs one dict lookup a step
            if type(node).__name__ in _ADDITIONS and any(after is previous[1] for after, _ in node.next_functions):
                self._skip[previous[0]] = True
        if row not in self._skip and row not in self._untold:
            found = has_addition(x, out)
            if found is None:
                self._untold.add(row)  # no graph at its input, or too large a graph: not walked again
            else:
                self._skip[row] = found

    def _on_grad(self, row: int, grad: torch.Tensor) -> None:
        self._squares.append(sum_of_squares(grad))
        self._calls.append(row)
        self._count[row] += grad.numel()

    def collect(self, step: int) -> None:
        """Keep the step's per-call sums of squares (one stack) and its layout; ``finish`` reduces at the flush."""
        if not self._squares:
            return
        seen = tuple(r for r, n in enumerate(self._count) if n)
        layout = (tuple(self._calls), seen, tuple(self._count[r] for r in seen), tuple(self._order),
                  tuple(self._order.values()), tuple(sorted(self._low)), tuple(sorted(self._skip.items())))
        self.defer(self.buffer.open(step), layout, torch.stack(self._squares))
        self._reset()

    def finish(self, layout: tuple[tuple[int, ...], ...], slots: torch.Tensor, squares: torch.Tensor) -> None:
        calls, seen, counts, order, positions, low, skip = layout
        sq = torch.zeros(squares.shape[0], len(self._count), dtype=self.dtype, device=self.device)
        sq.index_add_(1, self.host_tensor(calls, torch.long), squares.to(self.dtype))  # calls of a row pooled
        picked = sq.index_select(1, self.host_tensor(seen, torch.long))
        # backward_rms and backward_norm of the rows seen, the forward order, the 16-bit rows: one write
        rms_norm = torch.cat([picked / self.host_tensor(counts, self.dtype), picked], dim=1).sqrt_()
        fixed = self.host_tensor([*positions, *([1] * len(low)), *(float(has) for _, has in skip)],
                                 self.dtype).expand(len(picked), -1)
        where = self.cells(("backward_rms", seen), ("backward_norm", seen), ("forward_index", order),
                           ("low_precision_out", low), ("skip_path", [row for row, _ in skip]))
        self.buffer.put_steps(slots, where, torch.cat([rms_norm, fixed], dim=1))

    def _reset(self) -> None:
        self._previous_block = None
        self._low: set[int] = set()
        self._order.clear()
        self._squares.clear()
        self._calls.clear()
        self._count = [0] * len(self._count)

    def reset(self) -> None:
        super().reset()
        self._reset()
