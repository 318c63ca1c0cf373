"""Where lab results live: one SQLite file, one row per finished run, written in one transaction.

A run is identified by (suite, key), the key being a canonical JSON of its configuration and seed, so a
rerun of a suite asks ``finished()`` and skips what is there. A result is inserted in a single
transaction with the journal in WAL mode, so a process killed at any moment (Ctrl-C or ``kill -9``)
leaves every earlier result and no half-written row: SQLite either committed the transaction or it did
not. Results are JSON (metrics, curves, per-layer ratios), never pickle.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError

__all__ = ["Store", "run_key"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    suite    TEXT NOT NULL,
    key      TEXT NOT NULL,          -- canonical JSON of the run's configuration (with its seed)
    config   TEXT NOT NULL,          -- the same configuration, as given
    result   TEXT NOT NULL,          -- JSON: final/best metrics, curves, gradient ratios
    wall_s   REAL NOT NULL,
    finished REAL NOT NULL,          -- unix time
    PRIMARY KEY (suite, key)
)
"""


def run_key(config: dict[str, Any]) -> str:
    """A canonical string for a configuration: the same config always gives the same key."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise GradmedicError(f"A run's configuration must be plain JSON (numbers, strings, lists, dicts): "
                             f"{error}") from None


class Store:
    """Results of lab runs in an SQLite file (created on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise GradmedicError(f"{str(self.path)!r} is not a gradmedic lab database ({error}); give another "
                                 "--db path.") from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30.0)

    def finished(self, suite: str) -> set[str]:
        """Keys of the runs of ``suite`` that have a result."""
        with closing(self._connect()) as db:
            return {row[0] for row in db.execute("SELECT key FROM runs WHERE suite = ?", (suite,))}

    def put(self, suite: str, config: dict[str, Any], result: dict[str, Any], wall_s: float) -> None:
        """Record one finished run, atomically; a second result for the same run replaces the first."""
        payload = json.dumps(result, allow_nan=True)
        with closing(self._connect()) as db, db:  # one transaction: committed whole or not at all
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                       (suite, run_key(config), json.dumps(config, sort_keys=True), payload, float(wall_s),
                        time.time()))

    def results(self, suite: str | None = None) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], float]]:
        """(suite, config, result, wall seconds) for every stored run, oldest first."""
        query = "SELECT suite, config, result, wall_s FROM runs"
        args: tuple = ()
        if suite is not None:
            query += " WHERE suite = ?"
            args = (suite,)
        with closing(self._connect()) as db:
            rows = db.execute(query + " ORDER BY finished", args).fetchall()
        for name, config, result, wall in rows:
            yield name, json.loads(config), json.loads(result), wall

    def suites(self) -> list[str]:
        with closing(self._connect()) as db:
            return [row[0] for row in db.execute("SELECT DISTINCT suite FROM runs ORDER BY suite")]
