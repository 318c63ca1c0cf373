"""A self-contained HTML page: inline CSS, figures embedded as base64 PNG, every text escaped.

Module names and labels come from user code and are always passed through ``html.escape``, so a layer
called ``<script>`` shows as text. The page needs no network and no JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from gradmedic._files import write_atomic

__all__ = ["Page", "write_page"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1000px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;display:block;margin:.6em 0}
.supported{background:#dcf5dc}.not-supported{background:#fadcdc}.mixed,.inconclusive{background:#fff2cc}
.not-tested-at-this-budget,.not-run{background:#eeeeee}
.error{background:#fadcdc}.warning{background:#fff2cc}.info{background:#e8f0fe}
.muted{color:#777;font-size:.85em}
summary{cursor:pointer;font-weight:600;margin:.6em 0}
"""


class Page:
    """Collects headings, paragraphs, tables and figures; ``html()`` returns the whole document."""

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def lead(self, text: str, cls: str = "") -> None:
        """A bold line right under the title (a verdict), whatever was added before it."""
        cls = f' class="{html.escape(cls)}"' if cls else ""
        self._parts.insert(1, f"<p{cls}><b>{html.escape(text)}</b></p>")

    def body(self) -> list[str]:
        """The parts after the title, as HTML (a notebook shows them under a heading of its own)."""
        return list(self._parts[1:])

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, muted: bool = False) -> None:
        cls = ' class="muted"' if muted else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[object]],
              row_classes: Sequence[str] | None = None, folded: str | None = None) -> None:
        """``folded``: the table sits closed inside ``<details>`` under that summary (no script needed)."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = []
        for i, row in enumerate(rows):
            cls = f' class="{html.escape(row_classes[i])}"' if row_classes and row_classes[i] else ""
            cells = "".join(
                f'<td class="num">{html.escape(str(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                else f"<td>{html.escape(str(c))}</td>" for c in row)
            body.append(f"<tr{cls}>{cells}</tr>")
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        if folded is not None:
            table = f"<details><summary>{html.escape(folded)}</summary>{table}</details>"
        self._parts.append(table)

    def figure(self, fig, alt: str) -> None:
        """Embed a matplotlib figure as a PNG and close it (figures hold memory until closed)."""
        import matplotlib.pyplot as plt  # optional: the report extra

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        self._parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def html(self) -> str:
        body = "\n".join(self._parts)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_page(page: Page, path: str | os.PathLike) -> Path:
    """Write atomically and durably (``gradmedic._files.write_atomic``): an existing report is replaced whole
    or left as it was, and a symbolic link planted at the path or beside it never redirects the write."""
    return write_atomic(path, page.html().encode("utf-8"))
