"""rich, for gradmedic's tables and progress bars, imported without touching the user's Python RNG.

``rich.style`` draws ``random.getrandbits(24)`` when it is first imported (the seed of an id counter), so the first
report a user printed moved ``random``'s state: a seeded run gave other numbers after a ``print(report)``. Every
gradmedic module takes rich from here, imported on first use, with ``random``'s state put back after.
"""

from __future__ import annotations

import random

_state = random.getstate()
try:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from rich.text import Text
finally:
    random.setstate(_state)

__all__ = ["BarColumn", "Console", "Measurement", "MofNCompleteColumn", "Progress", "Table", "Text", "TextColumn",
           "TimeElapsedColumn"]
