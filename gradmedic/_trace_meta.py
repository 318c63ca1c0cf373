"""TraceMeta: what a trace says about the model and the run it measured, as a typed record (it was a free dict whose
keys were a schema nobody wrote down). The Monitor fills it; ``gm.check`` adds how it checked; the rules, the
reports and ``treat`` read it; a saved trace carries it as JSON. Unknown keys (a newer file's, a user's own) are kept
in ``extra``, so nothing read from a file is lost on saving it again.

It reads and writes like the mapping it replaces (``meta.get("roles", {})``, ``meta["check"] = {...}``): a field
that was never set is absent, so ``get`` returns its default."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any

from gradmedic._errors import GradmedicError

__all__ = ["TraceMeta"]


@dataclass
class TraceMeta(MutableMapping):
    model: str | None = None  # the model's class name (wrappers looked through)
    preset: str | None = None  # the Monitor's preset ("custom" with the user's own probes)
    modules: list[str] | None = None  # every module's qualified name, in definition order
    types: dict[str, str] | None = None  # module name -> class name
    params: dict[str, int] | None = None  # module name -> trainable parameters it owns (modules that own some)
    roles: dict[str, str] | None = None  # module name -> role (architecture.ROLES: block, norm, attention, ...)
    dtype: str | None = None  # the parameters' dtype ("float32", "float16", ...)
    device: str | None = None
    probes: list[str] | None = None  # the probes that measured, as their reprs
    torch: str | None = None  # torch's version
    optimizer: str | None = None  # the Monitor's optimizer, its class name (update_too_large reads it)
    frozen: list[str] | None = None  # layers whose parameters were all frozen after the Monitor was built
    check: dict[str, Any] | None = None  # how gm.check made it: steps, the loss, ...; None for a training run
    distributed: dict[str, Any] | None = None  # ranks and how their numbers were combined
    # what gm.check read from the loss's graph and the optimizer (issue 28; absent from a Monitor's run):
    optimized: list[str] | None = None  # layers the user's optimizer holds parameters of (None: every layer)
    loss_matched: list[str] | None = None  # activations the loss cancels (sigmoid -> BCE: p - y at the logit)
    scoring: list[str] | None = None  # layers whose output reaches the loss only through a softmax
    attended: list[str] | None = None  # layers whose output an attention mixes (the loss reads every position)
    branches: list[str] | None = None  # parallel heads and their side branches (layers that feed not every head)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    # the type each field must have when read from a file: a wrong one is refused in one line, not a crash later
    _KINDS = {"model": str, "preset": str, "modules": list, "types": dict, "params": dict, "roles": dict,
              "dtype": str, "device": str, "probes": list, "torch": str, "optimizer": str, "frozen": list,
              "check": dict, "distributed": dict, "optimized": list, "loss_matched": list, "scoring": list,
              "attended": list, "branches": list}

    @classmethod
    def of(cls, values: Mapping[str, Any] | None) -> TraceMeta:
        """A TraceMeta from a mapping (a file's JSON, a test's few keys); a field of the wrong type is a
        GradmedicError naming it."""
        if isinstance(values, TraceMeta):
            return values
        meta = cls()
        for key, value in dict(values or {}).items():
            meta[key] = value
        return meta

    def to_dict(self) -> dict[str, Any]:
        """The JSON a saved trace holds: the fields that are set, then the unknown keys."""
        return dict(self.items())

    def _known(self, key: str) -> bool:
        return key in self._KINDS

    def __getitem__(self, key: str) -> Any:
        if self._known(key):
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise GradmedicError(f"A trace's meta keys should be strings, but given {type(key).__name__}.")
        if self._known(key):
            kind = self._KINDS[key]
            if value is not None and not isinstance(value, kind):
                raise GradmedicError(f"meta.{key} should be a {kind.__name__}, not {type(value).__name__}: the trace "
                                     "was not written by gradmedic or was changed; save it again from a Monitor.")
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if self._known(key):
            if getattr(self, key) is None:
                raise KeyError(key)
            setattr(self, key, None)
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from (f.name for f in fields(self) if f.name != "extra" and getattr(self, f.name) is not None)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)
