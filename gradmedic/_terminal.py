"""Text from the user's model or from a file, made safe to show on a terminal or in a spreadsheet.

A module name is any string ``add_module`` accepts, and a trace file can declare any name: an escape sequence in one
(``ESC[2J`` clears the screen, ``ESC]0;...BEL`` sets the window title, the C1 ``CSI`` byte does the same as ESC [)
reached the terminal raw through ``gradmedic check``, ``print(trace)`` and ``print(diagnose(trace))``: rich drops BEL
and backspace but passes ESC. Control characters and the bidirectional overrides (which reorder what is shown:
"Trojan Source") are written as visible escapes instead. A CSV cell starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return is a formula to a spreadsheet (OWASP's "CSV injection"); such a name is written after a ``'``.
"""

from __future__ import annotations

import re

__all__ = ["csv_cell", "printable"]

# C0 controls but tab and newline, DEL, C1 controls, and the bidi embeddings, overrides and isolates
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_NEWLINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, newlines: bool = True) -> str:
    """``text`` with every control character written as an escape (``\\x1b``); ``newlines=False`` escapes newlines and
    tabs too (a name is one line)."""
    return (_CONTROL if newlines else _CONTROL_OR_NEWLINE).sub(_escape, str(text))


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text, not as a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text
