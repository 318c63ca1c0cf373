"""What lies between a module's output and the loss, read from the loss's autograd graph (issue 28).

``gm.check`` holds the loss it back-propagated; the rules only see per-layer numbers. Two facts about the path from
a layer to the loss change how those numbers read, and only the graph shows them:

- **a loss that cancels the activation before it** (``matched``): a sigmoid whose output a binary cross-entropy reads
  has the gradient p - y at its logit: sigmoid' cancels, so a saturated output is a confident one, not one whose
  gradient is lost. Read as: the activation module's output node is the input of a ``BinaryCrossEntropyBackward0``
  node, and between that node and the loss lie only reductions and arithmetic (a sum, a mean, a sum of losses);
- **layers that only score** (``scoring``): a layer whose output reaches the loss only through a softmax
  (additive/Bahdanau ``W``, ``U``, ``v``; the logits of any attention written by hand) sets how the values are
  mixed, not the values: its gradient is small at init by design (near-uniform attention), and it is no point on
  the path the gradient takes to the layers before it;
- **layers an attention reads at every position** (``attended``): an encoder RNN whose states a decoder attends
  over gets its gradient at each step from the loss directly, so the horizon of its last output is not the model's;
- **parallel heads** (``branches``): where layers feed two or more heads (NeRF's density beside its colour
  branch), the heads and their side branches are no points of one chain; the trunk that feeds every head is.

``GraphReader`` records each module's output node during the forward (forward hooks, removed on exit) and reads the
graph once, from the loss, in ``read`` (a walk over its nodes: no backward runs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradmedic.architecture import clean_name, unwrap

__all__ = ["GraphReader"]

# nodes that sum, average or combine losses: a BCE reached through these alone is the loss the gradient starts from
_ARITHMETIC = ("AddBackward", "SubBackward", "MulBackward", "DivBackward", "MeanBackward", "SumBackward",
               "NegBackward", "ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "SqueezeBackward",
               "UnsqueezeBackward", "ExpandBackward", "CloneBackward", "ToCopyBackward")
# the losses whose gradient at the logit of the activation before them is p - y (its derivative cancels)
_MATCHED_LOSSES = {"BinaryCrossEntropyBackward0": "SigmoidBackward0"}
# shape-only nodes between an activation's output and the loss that reads it
_SHAPE = ("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "SqueezeBackward", "UnsqueezeBackward",
          "CloneBackward", "ToCopyBackward")
# an attention's softmax: one whose output mixes other values (a product), not the model's output probabilities
_SOFTMAX = "SoftmaxBackward0"
_MIXING = ("BmmBackward", "MmBackward", "MulBackward", "MatmulBackward")
_PASS = (*_SHAPE, "ExpandBackward", "NativeDropoutBackward", "TransposeBackward", "PermuteBackward")


def _is(node: Any, names: Iterable[str]) -> bool:
    return type(node).__name__.startswith(tuple(names))


class GraphReader:
    """Forward hooks that note each module's output node; ``read(loss)`` says which layers the loss's graph makes
    special (``matched``, ``scoring``). Use as a context manager around the forward; ``clear()`` before a forward
    whose graph replaces the last one (a training step)."""

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        self.outputs: dict[Any, set[str]] = {}
        self.handles: list = []
        self.owners = {clean_name(n) for n, m in self.model.named_modules()
                       if n and any(True for _ in m.parameters(recurse=False))}

    def __enter__(self) -> GraphReader:
        for name, module in self.model.named_modules():
            if name:
                self.handles.append(module.register_forward_hook(self._hook(clean_name(name))))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def clear(self) -> None:
        self.outputs.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(first, torch.Tensor) and first.grad_fn is not None:
                self.outputs.setdefault(first.grad_fn, set()).add(name)
        return hook

    def read(self, loss: torch.Tensor) -> dict[str, list[str]]:
        """{"matched": [...], "scoring": [...], "attended": [...], "branches": [...]}: module names, each list
        sorted; empty lists when nothing applies."""
        if loss.grad_fn is None or not self.outputs:
            return {"matched": [], "scoring": [], "attended": [], "branches": []}
        every = _reachable(loss.grad_fn, attention=False)
        return {"matched": sorted(self._matched(loss.grad_fn)), "scoring": sorted(self._scoring(loss.grad_fn, every)),
                "attended": sorted(self._attended(every)), "branches": sorted(self._branches(loss.grad_fn))}

    def _branches(self, root: Any) -> set[str]:
        """Where the parameterised layers feed parallel heads (two or more layers whose output reaches the loss
        through no other parameterised layer: NeRF's density beside its colour branch), the layers that do not feed
        every head: the heads and their side branches. Empty for one head, or where fewer than two layers feed every
        head (independent towers: nothing to call the trunk). One pass over the graph, each node's set of layers at
        or upstream of it held as the bits of an int."""
        bit: dict[str, int] = {}
        for names in self.outputs.values():
            for name in names:
                if name in self.owners:
                    bit.setdefault(name, len(bit))
        if len(bit) < 3:
            return set()
        memo: dict[Any, int] = {}
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            if node is None or (node in memo and not done):
                continue
            children = [n for n, _ in node.next_functions if n is not None]
            if not done:
                stack.append((node, True))
                stack.extend((n, False) for n in children if n not in memo)
                continue
            bits = 0
            for n in children:
                bits |= memo.get(n, 0)
            for name in self.outputs.get(node, ()):
                if name in bit:
                    bits |= 1 << bit[name]
            memo[node] = bits
        below = {name: 0 for name in bit}  # the layers each one's output feeds
        for node, names in self.outputs.items():
            upstream = memo.get(node, 0)
            for name in names:
                if name not in bit:
                    continue
                for other, i in bit.items():
                    if other != name and upstream >> i & 1:
                        below[other] |= 1 << bit[name]
        heads = {name for name in bit if not below[name]}
        heads_bits = sum(1 << bit[h] for h in heads)
        trunk = {name for name in bit if name not in heads and below[name] & heads_bits == heads_bits}
        if len(heads) < 2 or len(trunk) < 2:
            return set()
        return set(bit) - trunk

    def _attended(self, every: set[Any]) -> set[str]:
        """Modules whose output an attention mixes directly (the other operand of a product with a softmax: an
        encoder's states that a decoder attends over), so the loss reads each of its positions, not only the last."""
        found: set[str] = set()
        for node in every:
            if not _is(node, _MIXING):
                continue
            children = [n for n, _ in node.next_functions]
            if not any(_softmax_behind(n) for n in children):
                continue
            for child in children:
                while child is not None and child not in self.outputs and _is(child, _PASS):
                    child = child.next_functions[0][0] if child.next_functions else None
                found |= self.outputs.get(child, set())
        return found

    def _matched(self, root: Any) -> set[str]:
        found: set[str] = set()
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            name = type(node).__name__
            if name in _MATCHED_LOSSES:
                activation = node.next_functions[0][0] if node.next_functions else None
                while activation is not None and _is(activation, _SHAPE) and activation not in self.outputs:
                    activation = activation.next_functions[0][0]
                if activation is not None and type(activation).__name__ == _MATCHED_LOSSES[name]:
                    found |= self.outputs.get(activation, set())
            elif _is(node, _ARITHMETIC):
                todo.extend(n for n, _ in node.next_functions)
        return found

    def _scoring(self, root: Any, every: set[Any]) -> set[str]:
        """Modules all of whose output nodes lie upstream of the loss only through an attention's softmax: reachable
        from the loss, but not when the walk stops at every such softmax."""
        direct = _reachable(root, attention=True)
        by_module: dict[str, list[Any]] = {}
        for node, names in self.outputs.items():
            for name in names:
                by_module.setdefault(name, []).append(node)
        return {name for name, nodes in by_module.items()
                if any(n in every for n in nodes) and not any(n in direct for n in nodes)}


def _reachable(root: Any, attention: bool) -> set[Any]:
    """The graph's nodes upstream of ``root``; with ``attention``, not through an attention's softmax (one whose
    output, through shape-only nodes, feeds a product)."""
    seen: set[Any] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        children = [n for n, _ in node.next_functions]
        if attention and _is(node, _MIXING):
            children = [n for n in children if not _softmax_behind(n)]
        todo.extend(children)
    return seen


def _softmax_behind(node: Any) -> bool:
    while node is not None and _is(node, _PASS):
        node = node.next_functions[0][0] if node.next_functions else None
    return node is not None and type(node).__name__ == _SOFTMAX
