"""User-facing errors and warnings, with one message template (after ignite's)."""

from __future__ import annotations

from typing import Any

__all__ = ["GradmedicError", "GradmedicFindingWarning", "GradmedicWarning", "bad_argument", "first_line"]


class GradmedicError(ValueError):
    """A user error: the message names the value that was wrong and the fix."""


class GradmedicWarning(UserWarning):
    """Something gradmedic could not do; the user's training is unaffected."""


class GradmedicFindingWarning(GradmedicWarning):
    """A finding about the user's run, said while it trains (once per finding; again only when it worsens)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad_argument(name: str, expected: str, given: Any, fix: str | None = None) -> GradmedicError:
    """Build the one-line error for an argument that does not fit."""
    message = f"Argument {name} should be {expected}, but given {_show(given)}."
    if fix:
        message += f" {fix}"
    return GradmedicError(message)


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line, for the one-line errors that wrap it."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
