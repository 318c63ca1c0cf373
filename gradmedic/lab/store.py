"""Where lab results live: one SQLite file, one row per finished run, written in one transaction.

A run is identified by (suite, key), the key being a canonical JSON of its configuration and seed, so a
rerun of a suite asks ``finished()`` and skips what is there. A result is inserted in a single
transaction with the journal in WAL mode, so a process killed at any moment (Ctrl-C or ``kill -9``)
leaves every earlier result and no half-written row: SQLite either committed the transaction or it did
not. Results are JSON (metrics, curves, per-layer ratios), never pickle.

A database file may come from elsewhere: one of another schema, rows that are not JSON, or a path that
cannot be created give one GradmedicError line. Results come back in the order of their keys, so
whatever reads them (the claims' evidence) does not depend on which run happened to finish first.
One process at a time runs suites on a database (``exclusive()``, an OS lock released even by kill -9).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError, first_line

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
COLUMNS = ["suite", "key", "config", "result", "wall_s", "finished"]


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
        if self.path.is_dir():
            raise GradmedicError(f"{str(self.path)!r} is a directory; give a database file with --db.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise GradmedicError(f"cannot create the database {str(self.path)!r}: {error.strerror or error}; "
                                 "give another --db path.") from None
        with self._errors():
            with closing(self._connect()) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
        if columns != COLUMNS:
            raise GradmedicError(f"{str(self.path)!r} has a table 'runs' of another schema (columns {columns}); it "
                                 "is not a gradmedic lab database: give another --db path.")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30.0)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors (not a database, locked, disk full, unreadable) as one GradmedicError line."""
        try:
            yield
        except sqlite3.Error as error:
            raise GradmedicError(f"{str(self.path)!r} is not a gradmedic lab database or cannot be used "
                                 f"({type(error).__name__}: {first_line(error)}); give another --db path.") from None

    def finished(self, suite: str) -> set[str]:
        """Keys of the runs of ``suite`` that have a result."""
        with self._errors(), closing(self._connect()) as db:
            return {row[0] for row in db.execute("SELECT key FROM runs WHERE suite = ?", (suite,))}

    def put(self, suite: str, config: dict[str, Any], result: dict[str, Any], wall_s: float) -> None:
        """Record one finished run, atomically; a second result for the same run replaces the first."""
        payload = json.dumps(result, allow_nan=True)
        with self._errors(), closing(self._connect()) as db, db:  # one transaction: committed whole or not at all
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                       (suite, run_key(config), json.dumps(config, sort_keys=True), payload, float(wall_s),
                        time.time()))

    def results(self, suite: str | None = None) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], float]]:
        """(suite, config, result, wall seconds) for every stored run, in the order of (suite, key): the same
        order however the runs were scheduled or finished."""
        query = "SELECT suite, key, config, result, wall_s FROM runs"
        args: tuple = ()
        if suite is not None:
            query += " WHERE suite = ?"
            args = (suite,)
        with self._errors(), closing(self._connect()) as db:
            rows = db.execute(query + " ORDER BY suite, key", args).fetchall()
        for name, key, config, result, wall in rows:
            try:
                config, result, wall = json.loads(config), json.loads(result), float(wall)
            except (TypeError, ValueError) as error:
                raise GradmedicError(f"a row of {str(self.path)!r} ({name!r}, {str(key)[:60]!r}) is not JSON "
                                     f"({first_line(error)}); the database is damaged: delete the row or use "
                                     "another --db path.") from None
            if not isinstance(config, dict) or not isinstance(result, dict):
                raise GradmedicError(f"a row of {str(self.path)!r} ({name!r}) holds {type(config).__name__}/"
                                     f"{type(result).__name__} where a run's config and result objects belong; the "
                                     "database is damaged: delete the row or use another --db path.")
            yield name, config, result, wall

    def suites(self) -> list[str]:
        with self._errors(), closing(self._connect()) as db:
            return [str(row[0]) for row in db.execute("SELECT DISTINCT suite FROM runs ORDER BY suite")]

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the database for one running suite. A second ``gradmedic lab run`` on the same file is
        refused with one line instead of doing every run again beside the first. The lock is the OS's
        (flock on ``<db>.lock``), so a process that dies, even by kill -9, releases it."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            handle = open(lock_path, "a+")  # noqa: SIM115 - held for the duration of the block
        except OSError as error:
            raise GradmedicError(f"cannot create the lock {str(lock_path)!r}: {error.strerror or error}") from None
        try:
            if not _try_lock(handle):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise GradmedicError(f"{str(self.path)!r} is in use by another gradmedic lab run ({holder}); wait for "
                                     "it to finish (it saves every run it finishes) or give another --db path.")
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            handle.close()  # closing the file releases the lock


def _try_lock(handle: Any) -> bool:
    """A non-blocking exclusive lock on an open file: flock on POSIX, msvcrt on Windows."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # Windows
        import msvcrt  # Windows only

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
