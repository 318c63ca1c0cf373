"""Each benchmark owns one marked section of BENCHMARKS.md and rewrites only that."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, begin: str, end: str, block: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the old section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
