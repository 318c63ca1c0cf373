"""Per attention layer: the largest pre-softmax attention logit, and the entropy of the attention rows.

Attention logits that grow without bound make the softmax one-hot (its entropy collapses) and precede divergence:
every run with a max logit above 1e4 diverged in Wortsman et al. 2023 ("Small-scale proxies for large-scale
Transformer training instabilities"); Dehghani et al. 2023 (ViT-22B) saw the same growth and cured it with QK-norm;
Zhai et al. 2023 follow the entropy (attention entropy collapse).

Where the logits are materialised (a softmax called inside an attention module: Hugging Face's eager attention, a
hand-written one, ``nn.MultiheadAttention`` asked for its weights) they are read exactly from the softmax's input,
and the entropy from its output. Where they are not (``F.scaled_dot_product_attention``, which
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` call by default, as do Hugging Face's "sdpa" models) the
max logit is bounded from q and k: per sample and head, max_i |q_i| x max_j |k_j| x scale (Cauchy-Schwarz), plus the
largest entry of a float mask added to the logits; ``attn_logit_bound`` is 1 there (0 where exact) and the entropy is
not measured. A kernel that is no torch function (the ``flash_attn`` package's) is not seen: its layer has no reading.

The calls are seen through a ``TorchFunctionMode`` that is on only while an attention module's forward runs (the
role "attention" of ``gradmedic.architecture``), during a scheduled step, and each reading is booked under that
module. A softmax anywhere else (a classifier's output) is never looked at. Only forwards that build a graph count;
a checkpointed attention recomputed in the backward is read once (``base.in_backward``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gradmedic.probes.base import LayerIndex, Probe, in_backward

__all__ = ["AttentionProbe"]

SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})
SDPA = F.scaled_dot_product_attention
# torch functions that call a softmax or SDPA inside them (nn.MultiheadAttention's): a TorchFunctionMode is off while
# its handler runs, and calling the function again from there would only hand it back, so their inner calls are seen
# at the ATen level instead, by _AtenWatch around them
NESTED = frozenset({F.multi_head_attention_forward})
_aten = torch.ops.aten
ATEN_SOFTMAX = frozenset({_aten._softmax.default, _aten.softmax.int,
                          *([_aten._safe_softmax.default] if hasattr(_aten, "_safe_softmax") else [])})
# the fused attention kernels SDPA dispatches to (_scaled_dot_product_flash_attention_for_cpu, ..._efficient_...,
# ..._cudnn_...): q and k first, the scale a keyword, an additive bias (efficient, cudnn) fourth
ATEN_SDPA_PREFIX = "_scaled_dot_product_"


class _Watch(TorchFunctionMode):
    """Hands the softmax and SDPA calls of an attention module's forward to the probe; passes everything through.
    A failure in the probe's handler is kept for the probe to report when the module's forward ends (switching the
    probe off from inside its own mode would take the mode off torch's stack while torch holds it popped)."""

    def __init__(self, probe: AttentionProbe):
        super().__init__()
        self.probe = probe
        self.inside = 0  # > 0 while a handler runs (torch has popped the mode meanwhile)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in NESTED:
            with _AtenWatch(self.probe):
                return func(*args, **kwargs)
        if func is SDPA:
            _hand(self, self.probe.on_sdpa, _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key"),
                  _arg(args, kwargs, 3, "attn_mask"), _arg(args, kwargs, 6, "scale"))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in SOFTMAX:
            _hand(self, self.probe.on_softmax, _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim"), out)
        return out


class _AtenWatch(TorchDispatchMode):
    """The same at the ATen level, for the inside of a NESTED function: ``_softmax`` (exact) and the fused SDPA
    kernels (bounded)."""

    def __init__(self, probe: AttentionProbe):
        super().__init__()
        self.probe = probe
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.startswith(ATEN_SDPA_PREFIX):
            bias = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else kwargs.get("attn_mask")
            _hand(self, self.probe.on_sdpa, args[0], args[1], bias, kwargs.get("scale"))
        out = func(*args, **kwargs)
        if func in ATEN_SOFTMAX:
            _hand(self, self.probe.on_softmax, args[0], args[1], out)
        return out


def _hand(watch: _Watch | _AtenWatch, handler: Any, *args: Any) -> None:
    """Call the probe's ``handler``; a failure is kept on the probe (see _Watch), and the probe reads no more."""
    probe = watch.probe
    if probe.failed or probe.error is not None:
        return
    watch.inside += 1
    try:
        handler(*args)
    except Exception as error:  # noqa: BLE001 - reported when the forward ends; never reaches the user
        probe.error = error
    finally:
        watch.inside -= 1


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    """0-d tensors in one (calls,) tensor, in their promoted dtype: one kernel when they share one (the usual case),
    a cast of the others where not (a float16 logit under autocast beside a float32 bound)."""
    dtype = values[0].dtype
    for v in values:
        dtype = torch.promote_types(dtype, v.dtype)
    return torch.stack([v if v.dtype == dtype else v.to(dtype) for v in values])


class AttentionProbe(Probe):
    name = "attention"
    # attn_logit_max: the largest logit over the batch, heads and positions (exact, or a bound where
    # attn_logit_bound is 1); attn_entropy: the mean entropy (nats) of the attention rows, where they are seen
    metrics = ("attn_logit_max", "attn_entropy", "attn_logit_bound")
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._rows = [i for i, name in enumerate(layers.names) if layers.roles.get(name) == "attention"]
        self._zero = torch.zeros((), device=self.device)  # the entropy sum of an SDPA call
        self._calls: list[int] = []  # per call: the attention module's row
        self._logits: list[torch.Tensor] = []  # per call: its max logit (or bound), 0-d
        self._entropy: list[torch.Tensor] = []  # per call: sum over the rows of sum p log p, 0-d (0 for SDPA)
        self._attention_rows: list[int] = []  # per call: rows of attention probabilities it holds (0 for SDPA)
        self._bound: list[int] = []  # per call: 1 where the logit is a bound
        self._stack: list[int] = []  # attention modules running now
        self._forward_rows: set[int] = set()  # read outside a backward this step (see in_backward)
        self._watch: _Watch | None = None
        self.error: BaseException | None = None  # a failure inside the mode, reported when the forward ends

    def arm(self) -> None:
        assert self.layers is not None
        for row in self._rows:
            module = self.layers.modules[row]
            self._handles.append(module.register_forward_pre_hook(self.guard(self._enter, row)))
            self._handles.append(module.register_forward_hook(self.guard(self._leave, row), always_call=True))

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
        self._clear()

    def _clear(self) -> None:
        for store in (self._calls, self._logits, self._entropy, self._attention_rows, self._bound, self._forward_rows):
            store.clear()

    def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and not watch.inside:
            watch.__exit__(None, None, None)

    # --- which attention module is running -------------------------------------------------------------------
    def _enter(self, row: int, _module: nn.Module, _args: Any) -> None:
        if not torch.is_grad_enabled():
            return  # no graph, no training step
        if in_backward():
            if row in self._forward_rows:
                return  # a checkpointed attention recomputed: read in its first forward already
        else:
            self._forward_rows.add(row)
        self._stack.append(row)
        if self._watch is None:
            self._watch = _Watch(self)
            self._watch.__enter__()

    def _leave(self, row: int, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self._stack and self._stack[-1] == row:
            self._stack.pop()
            if not self._stack:
                self._stop_watch()
        if self.error is not None:
            error, self.error = self.error, None
            self.fail(error)

    # --- the readings ----------------------------------------------------------------------------------------
    def _keep(self, logit: torch.Tensor, entropy: torch.Tensor, rows: int, bound: int) -> None:
        self._calls.append(self._stack[-1])
        self._logits.append(logit)  # in the model's precision: cast once per stack at the collect (_stack)
        self._entropy.append(entropy)
        self._attention_rows.append(rows)
        self._bound.append(bound)

    def on_softmax(self, x: Any, dim: int | None, out: Any) -> None:
        """The logits (the input) and the attention probabilities (the output) of a softmax, exactly."""
        if not self._stack or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return
        dim = x.dim() - 1 if dim is None else dim
        p = out.detach()
        if p.dtype.itemsize < 4:
            p = p.float()
        # sum over every row of sum_j p_j log p_j (xlogy: 0 where p is 0, a masked position); -it / rows is the
        # mean entropy
        self._keep(x.detach().amax(), torch.special.xlogy(p, p).sum(), p.numel() // max(p.shape[dim], 1), 0)

    def on_sdpa(self, q: Any, k: Any, mask: Any, scale: float | None) -> None:
        """A bound of the max logit of ``F.scaled_dot_product_attention`` from q and k (Cauchy-Schwarz); ``mask``, a
        float one, is added to the logits."""
        if not self._stack or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
            return
        if q.numel() == 0 or k.numel() == 0:
            return
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        # the largest query and key norms of each sample and head: (..., heads)
        wide = torch.float32 if q.dtype.itemsize < 4 else None  # a float16 norm overflows past 256 per entry
        qn = torch.linalg.vector_norm(q.detach(), dim=-1, dtype=wide).amax(-1)
        kn = torch.linalg.vector_norm(k.detach(), dim=-1, dtype=wide).amax(-1)
        if q.dim() >= 3 and qn.shape[-1] != kn.shape[-1] and kn.shape[-1] > 0:
            kn = kn.repeat_interleave(qn.shape[-1] // kn.shape[-1], dim=-1)  # grouped-query attention
        bound = (qn * kn).amax() * scale
        if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.numel():
            bound = bound + mask.detach().amax().to(bound.dtype)  # added to every logit: the largest entry bounds it
        self._keep(bound, self._zero, 0, 1)

    def collect(self, step: int) -> None:
        """Keep the step's per-call readings (two stacks) and their layout; ``finish`` reduces them at the flush."""
        if self.error is not None:  # a forward that never reached its end hook
            error, self.error = self.error, None
            self.fail(error)
            return
        if self._calls:
            layout = (tuple(self._calls), tuple(self._attention_rows), tuple(self._bound))
            self.defer(self.buffer.open(step), layout, _stack(self._logits), _stack(self._entropy))
        self._clear()

    def finish(self, layout: tuple[tuple[int, ...], ...], slots: torch.Tensor, logits: torch.Tensor,
               entropy: torch.Tensor) -> None:
        calls, rows, bound = layout
        steps, dt, dev = logits.shape[0], self.dtype, self.device
        seen = sorted(set(calls))
        where = {row: i for i, row in enumerate(seen)}
        index = self.host_tensor([where[c] for c in calls], torch.long)
        top = torch.full((steps, len(seen)), -math.inf, dtype=dt, device=dev).scatter_reduce_(
            1, index.expand(steps, -1), logits.to(dt), "amax")
        sums = torch.zeros(steps, len(seen), dtype=dt, device=dev).index_add_(1, index, entropy.to(dt))
        counts = torch.zeros(len(seen), dtype=dt, device=dev).index_add_(0, index, self.host_tensor(rows, dt))
        flags = [float(any(b for c, b in zip(calls, bound, strict=True) if c == row)) for row in seen]
        mean_entropy = -sums / counts  # 0/0: no softmax seen in that layer, not measured
        values = torch.cat([top, mean_entropy, self.host_tensor(flags, dt).expand(steps, -1)], dim=1)
        cells = self.cells(("attn_logit_max", seen), ("attn_entropy", seen), ("attn_logit_bound", seen))
        self.buffer.put_steps(slots, cells, values)
