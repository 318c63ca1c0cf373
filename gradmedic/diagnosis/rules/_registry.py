"""The one registry of rules: each kind of finding is registered once, by the file that reads it, with how it reads
a trace and how it ranks the remedies for what it found. ``prescribe`` looks the ranking up here, so a new kind is
one file and one ``register`` call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradmedic.diagnosis.catalog import REMEDIES
from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.findings import KINDS

__all__ = ["RULES", "Rule", "prescribe", "register"]

# A transformer has residual blocks and norms already: adding them is no remedy.
TRANSFORMER_HAS = ("add_residual", "add_normalization")


@dataclass(frozen=True)
class Rule:
    """A kind of finding: ``read(trace, context)`` returns its findings, ``rank(context)`` the remedy ids for one of
    them, best first; on a transformer, ``transformer_first`` (norm placement "pre"/"post", or None for any) names
    the known fixes of depth in attention models, which come before the general ones (CATALOG.md)."""

    kind: str
    read: Callable[[Any, Context], list] = field(repr=False)
    rank: Callable[[Context], list[str]] = field(repr=False)
    transformer_first: Mapping[str | None, tuple[str, ...]] = field(default_factory=dict)


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to the registry; its kind must be one of ``KINDS`` and its remedies ids of the catalog."""
    if rule.kind not in KINDS:
        raise ValueError(f"Rule.kind should be one of KINDS, but given {rule.kind!r}.")
    unknown = [r for ids in rule.transformer_first.values() for r in ids if r not in REMEDIES]
    if unknown:
        raise ValueError(f"Rule.transformer_first should hold ids from REMEDIES, but given {unknown}.")
    RULES[rule.kind] = rule
    return rule


def prescribe(kind: str, context: Mapping[str, Any] | None) -> list[str]:
    """Ranked remedy ids for one kind of finding, given what the model is made of (a Context, or a mapping of some
    of its fields). The ranking follows what the field's experiments show first-hand (../shared/CATALOG.md and the
    lab): each rule's file says why for its kinds."""
    rule = RULES.get(kind)
    if rule is None:
        raise ValueError(f"Argument kind should be one of the finding kinds, but given {kind!r}.")
    ctx = Context.of(context)
    ids = list(rule.rank(ctx))
    if ctx.model_kind == "transformer":
        first = rule.transformer_first.get(ctx.norm_placement, rule.transformer_first.get(None, ()))
        ids = list(first) + [i for i in ids if i not in TRANSFORMER_HAS]
    return list(dict.fromkeys(ids))
