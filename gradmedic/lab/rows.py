"""The shape of a lab row, checked before the claims or the report read it.

``Store.results`` guarantees JSON objects, not what is in them: a database from elsewhere (or one edited
by hand) can hold a configuration without a seed, a label the claims cannot parse, or a result whose curve
is a string. Reading such a row deep inside the claims or the figures was a traceback (``KeyError: 'seed'``,
``ValueError`` from ``int()``); here it is one GradmedicError line naming the row, the field and the fix.
Only what is read with ``[]`` is required; what is read with ``.get`` may be missing.
"""

from __future__ import annotations

import re
from typing import Any

from gradmedic._errors import GradmedicError

__all__ = ["check_report_rows", "check_rows", "label_number"]

_FIX = ("rows written by gradmedic lab run always have it: delete the row (or rerun the suite into a new --db "
        "path)")


def _who(config: dict[str, Any]) -> str:
    parts = [f"{k} {str(config[k])[:60]!r}" for k in ("experiment", "label", "seed") if k in config]
    return ", ".join(parts) or f"configuration {str(config)[:80]}"


def _kind(value: Any) -> str:
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or _is_number(v) for v in value)


def check_rows(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Every row's configuration names its experiment, label (strings) and seed (an integer)."""
    for config, result in rows:
        if not isinstance(config, dict) or not isinstance(result, dict):
            raise GradmedicError(f"a lab row holds {_kind(config)}/{_kind(result)} where a run's configuration and "
                                 f"result objects belong; {_FIX}.")
        for key, ok, what in (("experiment", lambda v: isinstance(v, str), "a string"),
                              ("label", lambda v: isinstance(v, str), "a string"),
                              ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")):
            if key not in config:
                raise GradmedicError(f"a lab row ({_who(config)}) has no {key!r} in its configuration; {_FIX}.")
            if not ok(config[key]):
                raise GradmedicError(f"a lab row ({_who(config)}) has {key!r} = {str(config[key])[:40]!r} "
                                     f"({_kind(config[key])}), where {what} belongs; {_FIX}.")


def check_report_rows(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """``check_rows``, and the result fields the report's tables and figures read: the baseline, the loss
    curve (steps and losses of one length, the same steps for every seed of a run), the per-layer gradient
    profile and the time profile."""
    check_rows(rows)
    steps_of: dict[tuple[str, str], int] = {}
    for config, result in rows:
        def bad(field: str, should: str, config: dict[str, Any] = config) -> GradmedicError:
            return GradmedicError(f"a lab row ({_who(config)}) has a result whose {field} should be {should}; "
                                  f"{_FIX}.")

        if not _is_number(result.get("baseline")):
            raise bad("'baseline'", "a number")
        curve = result.get("curve")
        if not isinstance(curve, dict) or not _numbers(curve.get("steps")) or not _numbers(curve.get("loss")) \
                or len(curve["steps"]) != len(curve["loss"]):
            raise bad("'curve'", "an object of 'steps' and 'loss', two lists of numbers of one length")
        run = (config["experiment"], config["label"])
        if steps_of.setdefault(run, len(curve["steps"])) != len(curve["steps"]):
            raise bad("'curve'", f"as long as the other seeds' ({steps_of[run]} points)")
        grads = result.get("gradients")
        if not isinstance(grads, dict) or not isinstance(grads.get("layers"), list) \
                or not all(isinstance(n, str) for n in grads["layers"]) or not _numbers(grads.get("steps")) \
                or not isinstance(grads.get("grad_norm"), list) \
                or not all(_numbers(row) and len(row) == len(grads["layers"]) for row in grads["grad_norm"]):
            raise bad("'gradients'", "an object of 'layers', 'steps' and 'grad_norm' (one list of numbers per "
                                     "step, one number per layer)")
        time = result.get("time")
        if not isinstance(time, dict) or (time and not _numbers(time.get("init"))):
            raise bad("'time'", "an object, empty or with 'init', a list of numbers")


_LABEL_NUMBER = re.compile(r"[0-9]{1,9}")


def label_number(label: str, mark: str) -> int:
    """The whole number a label ends with after ``mark``: ``label_number("plain d=30", "d=")`` is 30. A label
    with anything else there ("plain d=30x") is one GradmedicError line, not a ValueError from ``int()``."""
    text = label.rsplit(mark, 1)[-1]
    if not _LABEL_NUMBER.fullmatch(text):
        raise GradmedicError(f"a lab row's label {label[:80]!r} should end in a whole number after {mark!r} (as "
                             f"'plain {mark}30'), not {text[:40]!r}; {_FIX}.")
    return int(text)
