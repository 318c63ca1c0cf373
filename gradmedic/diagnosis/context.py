"""Context: a frozen record of what the rules know of the model, read from the trace's module types and roles (so a
loaded trace has it too). The rules judge with it and rank remedies by it; ``treat``'s actions read it; a Report
carries it. It reads like a mapping too (``report.context["norm_placement"]``), as the free dict it replaces did.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from gradmedic.architecture import ACTIVATION_KINDS, RECTIFIERS, TORCH_NORM_NAMES, model_kind
from gradmedic.trace import Trace

__all__ = ["Context", "context_of", "norm_placement"]


@dataclass(frozen=True)
class Context(Mapping):
    """What the model is made of. Every field has a default, so a rule or a test can build one from a few keys
    (``Context.of({"relu": True})``)."""

    saturating: bool = False  # sigmoid/tanh-like activations, as modules or called as functions
    relu: bool = False  # the rectifier family (architecture.RECTIFIERS): He init is theirs
    normalized: bool = False  # BatchNorm/LayerNorm/GroupNorm/RMSNorm present
    batchnorm: bool = False
    rnn: bool = False  # a plain (tanh/ReLU) recurrent layer
    lstm: bool = False
    gru: bool = False
    depth: int = 0  # parameterised layers that are not norms
    low_precision: bool = False  # float16/bfloat16 weights, or float32 weights under autocast
    autocast: bool = False  # 16-bit outputs of float32 weights: a 16-bit backward
    activations: tuple[str, ...] = ()  # the activation module classes, by name
    model_kind: str | None = None  # architecture.model_kind: "transformer", "recurrent", "convolutional", "mlp"
    norm_placement: str | None = None  # "pre" or "post": where a block's first norm runs; None without blocks
    blocks: int = 0  # residual blocks

    @classmethod
    def of(cls, values: Mapping[str, Any] | None) -> Context:
        """A Context from a mapping (a Report's context loaded from JSON, a test's few keys); unknown keys are
        ignored, missing ones take their defaults."""
        if isinstance(values, Context):
            return values
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in dict(values or {}).items() if k in names}
        if "activations" in given:
            given["activations"] = tuple(given["activations"])
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # a mapping's reading, for code and users that held the dict this replaces
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


def context_of(trace: Trace) -> Context:
    """What the model is made of, from the trace's module types and roles (so a loaded trace has it too)."""
    types = trace.meta.get("types", {})
    roles = trace.meta.get("roles", {})
    kinds = set(types.values())
    params = trace.meta.get("params", {})
    act_kind = {k: ACTIVATION_KINDS[k] for k in kinds if k in ACTIVATION_KINDS}
    norms = {name for name, role in roles.items() if role == "norm"} or \
        {n for n, t in types.items() if t in TORCH_NORM_NAMES}
    low_out = "low_precision_out" in trace.metrics and bool(np.any(trace.metric("low_precision_out") == 1))
    saturating_calls, relu_calls = _functional_activations(trace)
    return Context(
        saturating="saturating" in act_kind.values() or saturating_calls,
        relu=bool(kinds & RECTIFIERS) or "relu" in act_kind.values() or relu_calls,
        normalized=bool(norms),
        batchnorm=any("BatchNorm" in k for k in kinds),
        rnn="RNN" in kinds or "RNNCell" in kinds,
        lstm="LSTM" in kinds or "LSTMCell" in kinds,
        gru="GRU" in kinds or "GRUCell" in kinds,
        depth=sum(1 for name in params if name not in norms),
        low_precision=trace.meta.get("dtype") in ("float16", "bfloat16") or low_out,
        autocast=low_out and trace.meta.get("dtype") not in ("float16", "bfloat16"),
        activations=tuple(sorted(act_kind)),
        model_kind=model_kind(types, roles),
        norm_placement=norm_placement(trace),
        blocks=sum(1 for role in roles.values() if role == "block"),
    )


# the layers that transform a block's input (its attention's projections, its MLP, a conv): a norm that runs
# before the first of them normalises the block's input (pre-LN); one after, its output (post-LN). Helpers that
# run first without touching the stream (BEiT's relative position bias table, a stage's patch embedding) do not
# vote
_COMPUTE_ROLES = frozenset({"attention", "attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_in", "linear", "conv",
                            "recurrent"})


def _functional_activations(trace: Trace) -> tuple[bool, bool]:
    """Whether the model calls saturating (sigmoid/tanh-like) and ReLU-family activations as functions
    (``torch.sigmoid(self.fc(x))``), read from what the activation probe measured at rows that are no activation
    modules: a saturated share is measured for the saturating families only, a dead share for the ReLU family only
    (which ReLU6 also saturates in, so a row with both counts as ReLU)."""
    roles = trace.meta.get("roles", {})
    rows = [j for j, name in enumerate(trace.layers) if roles.get(name) != "activation"]

    def seen(metric: str) -> np.ndarray:
        if metric not in trace.metrics or not rows:
            return np.zeros(len(rows), dtype=bool)
        return np.any(np.isfinite(trace.metric(metric)[:, rows]), axis=0)

    saturated, dead = seen("saturated_frac"), seen("dead_frac")
    return bool(np.any(saturated & ~dead)), bool(np.any(dead))


def norm_placement(trace: Trace) -> str | None:
    """"pre" when most residual blocks run a norm before their first projection (pre-LN), "post" when they run
    it after their attention/MLP (post-LN), read from the order in which the block's layers ran; None without
    blocks."""
    roles = trace.meta.get("roles", {})
    blocks = [n for n, r in roles.items() if r == "block"]
    if not blocks or "forward_index" not in trace.metrics:
        return None
    order = {k: v for k, v in trace.last("forward_index").items()}
    votes = []
    for block in blocks:
        inside = sorted((order[n], n) for n in order
                        if n.startswith(block + ".") and roles.get(n) in _COMPUTE_ROLES | {"norm"})
        if inside:
            votes.append(roles.get(inside[0][1]) == "norm")
    if not votes:
        return None
    return "pre" if sum(votes) * 2 > len(votes) else "post"
