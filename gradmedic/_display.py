"""How an object shows itself in a notebook, without its class importing the stage that draws it: ``Report``,
``Finding``, ``Trace`` and ``Treatment`` answer Jupyter's ``_repr_html_`` through ``html_of``, and the report stage
(``gradmedic.report.notebook``, imported by ``import gradmedic``) registers how each is drawn. A lower stage then
names no higher one: the drawing is handed down, not fetched up."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

__all__ = ["html_of", "register_html"]

_DRAWERS: dict[str, Callable[[Any], str]] = {}


def register_html(class_name: str, draw: Callable[[Any], str]) -> None:
    """``draw(obj) -> HTML`` for objects whose class is named ``class_name``."""
    _DRAWERS[class_name] = draw


def html_of(obj: Any) -> str:
    """The registered drawing of ``obj``; its text in a ``<pre>`` when none is registered."""
    draw = _DRAWERS.get(type(obj).__name__)
    if draw is None:
        return f"<pre>{html.escape(str(obj))}</pre>"
    return draw(obj)
