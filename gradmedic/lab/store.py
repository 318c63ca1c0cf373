"""Where lab results live: one SQLite file, one row per finished run, written in one transaction.

A run is identified by (suite, key), the key being a canonical JSON of its configuration and seed, so a
rerun of a suite asks ``finished()`` and skips what is there. A result is inserted in a single
transaction with the journal in WAL mode, so a process killed at any moment (Ctrl-C or ``kill -9``)
leaves every earlier result and no half-written row: SQLite either committed the transaction or it did
not. Results are JSON (metrics, curves, per-layer ratios), never pickle. Each insert is read back in its
own transaction before it commits, so a run is never counted as saved when the database did not keep it.

A database file may come from elsewhere, and is then untrusted input:

- ``Store(path, readonly=True)`` (``gradmedic report``, ``lab publish``) changes nothing: the file is
  opened read-only (``immutable`` when no journal or WAL file lies beside it, so not even SQLite's shared
  memory file is created, and a database on a read-only mount can be read), no table is added and the
  journal mode is left as it is. The write path (``lab run``) also looks at an existing file read-only
  first, and only then switches it to WAL and adds the table.
- Its schema is checked before any row is read: a table ``runs`` with our columns, and no trigger and no
  view (ours has none; a trigger can drop or rewrite what is inserted, a view named ``runs`` can be a
  query that never ends).
- Every connection is bounded: in time (SQLite's progress handler interrupts it ``MAX_QUERY_S`` after
  it opened; each operation opens its own), per value (``SQLITE_LIMIT_LENGTH``: a row's config or result
  over ``MAX_ROW_BYTES`` is refused before it is read into memory) and in all (``MAX_READ_BYTES`` per
  read), and JSON nested deeper than ``MAX_ROW_DEPTH`` is refused.
- Whatever goes wrong is one GradmedicError line that says what it was: not an SQLite file, damaged, a
  full disk, a database deleted or made read-only, locked, too slow, too large.

Results come back in the order of their keys, so whatever reads them (the claims' evidence) does not
depend on which run happened to finish first. One process at a time runs suites on a database
(``exclusive()``, an OS lock released even by kill -9, on a lock file that is never a link).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError, first_line
from gradmedic.lab.lockfile import open_lock, try_lock

__all__ = ["MAX_QUERY_S", "MAX_READ_BYTES", "MAX_ROW_BYTES", "MAX_ROW_DEPTH", "Store", "run_key"]

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

# One value (a row's config or result) at most. A lab result is 10-100 KB (60 loss points, 8 snapshots of
# per-layer norms, a time profile); 16 MiB is over 100x that, and json.loads turns it into ~100 MiB of
# Python objects. A 300 MiB row peaked at 1.1 GiB before this limit. SQLite checks it before it reads the
# value (SQLITE_LIMIT_LENGTH), and refuses to write a larger one too.
MAX_ROW_BYTES = 16 * 1024**2
# All the rows one read returns (a suite's results). The largest suite ("full") has a few hundred runs,
# some 30 MB; 512 MiB is over 10x that and still fits a laptop's memory once parsed.
MAX_READ_BYTES = 512 * 1024**2
# One operation on the database (a schema check, a read, an insert). Our reads of a full suite take well
# under a second; a minute is for a slow network disk. It bounds a hostile query (a recursive view) that
# would otherwise never end. Read when a connection opens, so a test can lower it.
MAX_QUERY_S = 60.0
PROGRESS_EVERY = 10_000  # SQLite VM instructions between two looks at the clock (well under a millisecond)
# JSON nesting of a row: ours is 4 deep (result -> gradients -> grad_norm -> one step's layers); json
# itself stops near 1,000 with RecursionError, and deep lists would crash whatever walks them later.
MAX_ROW_DEPTH = 32

_FIX = "give another --db path"


def run_key(config: dict[str, Any]) -> str:
    """A canonical string for a configuration: the same config always gives the same key."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise GradmedicError(f"A run's configuration must be plain JSON (numbers, strings, lists, dicts): "
                             f"{error}") from None


class Store:
    """Results of lab runs in an SQLite file (created on first use, unless ``readonly``)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._opened = False  # once it was opened, a database that is gone was deleted or moved
        if self.path.is_dir():
            raise GradmedicError(f"{str(self.path)!r} is a directory; give a database file with --db.")
        if readonly:
            if not self.path.is_file():
                raise GradmedicError(f"no such lab database: {str(self.path)!r} (run gradmedic lab run SUITE --db "
                                     f"{self.path} first)")
            self._read(self._check_schema)
            self._opened = True
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise GradmedicError(f"cannot create the database {str(self.path)!r}: {error.strerror or error}; "
                                 f"{_FIX}.") from None
        if self.path.is_file() and self.path.stat().st_size > 0:  # someone's file: look before changing it
            self._read(lambda db: self._check_schema(db, creating=True), readonly=True)
        with self._errors(), closing(self._connect(create=True)) as db, db:
            self._check_schema(db, creating=True)  # again, on the connection that writes (a file may change)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            self._check_schema(db)
        self._opened = True

    # --- connections --------------------------------------------------------------------------------
    def _connect(self, readonly: bool | None = None, create: bool = False, snapshot: bool = True) -> sqlite3.Connection:
        """A connection with the time and size bounds of the module docstring. Read-only: ``immutable`` when
        ``snapshot`` and no journal or WAL file lies beside the database (nothing is created, a read-only mount
        works), else ``mode=ro``. Read-write: ``mode=rw``, so a database deleted while a suite runs is an error
        and not silently recreated empty (``create`` for the first opening only)."""
        readonly = self.readonly if readonly is None else readonly
        if readonly:
            quiet = snapshot and not any(_sidecar(self.path, s).exists() for s in _SIDECARS)
            mode = "immutable=1" if quiet else "mode=ro"
        else:
            mode = "mode=rwc" if create else "mode=rw"
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?{mode}", uri=True, timeout=30.0)
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_ROW_BYTES)
        deadline = time.monotonic() + MAX_QUERY_S
        db.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_EVERY)
        return db

    def _read(self, fn: Callable[[sqlite3.Connection], Any], readonly: bool | None = None) -> Any:
        """``fn(connection)`` on a reading connection. An ``immutable`` read assumes no one writes meanwhile:
        when the file changed under it (a ``lab run`` writing beside a report), it is read again with locks."""
        readonly = self.readonly if readonly is None else readonly
        for snapshot in (True, False):
            before = _fingerprint(self.path)
            with self._errors(), closing(self._connect(readonly=readonly, snapshot=snapshot)) as db:
                out = fn(db)
            if not readonly or not snapshot or _fingerprint(self.path) == before:
                return out
        return out  # pragma: no cover - the loop always returns

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as one GradmedicError line saying what went wrong (see ``_explain``)."""
        try:
            yield
        except sqlite3.Error as error:
            raise GradmedicError(_explain(self.path, error, self._opened)) from None
        except RecursionError:
            raise GradmedicError(f"{str(self.path)!r} holds JSON nested too deeply to read; the rows gradmedic "
                                 f"writes are {MAX_ROW_DEPTH} deep at most: {_FIX}.") from None

    def _check_schema(self, db: sqlite3.Connection, creating: bool = False) -> None:
        """Refuse what is not a lab database before reading a row of it: triggers, views, a ``runs`` that is
        not our table; and, unless ``creating`` in an empty database, a database without ``runs``."""
        objects = db.execute("SELECT type, name FROM sqlite_master").fetchall()
        where = repr(str(self.path))
        for kind in ("trigger", "view"):
            found = [str(name) for t, name in objects if t == kind]
            if found:
                raise GradmedicError(f"{where} has {kind}s ({_names(found)}); a gradmedic lab database has none, "
                                     f"and a {kind} can {_WHY[kind]}: it is not a gradmedic lab database: {_FIX}.")
        runs = [t for t, name in objects if str(name).lower() == "runs"]
        tables = [str(name) for t, name in objects if t == "table" and not str(name).startswith("sqlite_")]
        if not runs:
            if creating and not tables:
                return
            held = f"tables {_names(tables)}" if tables else "no tables"
            raise GradmedicError(f"{where} holds {held} and no table 'runs': it is not a gradmedic lab database "
                                 f"(nothing was changed); {_FIX}.")
        if runs != ["table"]:
            raise GradmedicError(f"{where} has a {runs[0]} named 'runs' where our table belongs: it is not a "
                                 f"gradmedic lab database; {_FIX}.")
        columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
        if columns != COLUMNS:
            raise GradmedicError(f"{where} has a table 'runs' of another schema (columns {columns}); it is not a "
                                 f"gradmedic lab database: {_FIX}.")

    # --- reading and writing ------------------------------------------------------------------------
    def finished(self, suite: str) -> set[str]:
        """Keys of the runs of ``suite`` that have a result."""
        def keys(db: sqlite3.Connection) -> set[str]:
            return {row[0] for row in db.execute("SELECT key FROM runs WHERE suite = ?", (suite,))}
        return self._read(keys)

    def put(self, suite: str, config: dict[str, Any], result: dict[str, Any], wall_s: float) -> None:
        """Record one finished run, atomically; a second result for the same run replaces the first. The row
        is read back before the transaction commits: a database that did not keep it is an error."""
        payload = json.dumps(result, allow_nan=True)
        key = run_key(config)
        with self._errors(), closing(self._connect(readonly=False)) as db, db:  # one transaction: all or nothing
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                       (suite, key, json.dumps(config, sort_keys=True), payload, float(wall_s), time.time()))
            stored = db.execute("SELECT result FROM runs WHERE suite = ? AND key = ?", (suite, key)).fetchall()
            if stored != [(payload,)]:
                raise GradmedicError(f"{str(self.path)!r} did not keep the result just written ({len(stored)} rows "
                                     f"read back for one run of {suite!r}; a trigger or another program changes "
                                     f"it): {_FIX}.")

    def results(self, suite: str | None = None) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], float]]:
        """(suite, config, result, wall seconds) for every stored run, in the order of (suite, key): the same
        order however the runs were scheduled or finished."""
        query = "SELECT suite, key, config, result, wall_s FROM runs"
        args: tuple = ()
        if suite is not None:
            query += " WHERE suite = ?"
            args = (suite,)

        def fetch(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows, total = [], 0
            try:
                for row in db.execute(query + " ORDER BY suite, key", args):
                    total += sum(len(v) for v in row[:4] if isinstance(v, (str, bytes)))
                    if total > MAX_READ_BYTES:
                        raise GradmedicError(f"{str(self.path)!r} holds over {MAX_READ_BYTES // 1024**2} MiB of "
                                             f"results{f' for suite {suite!r}' if suite else ''}, far more than a "
                                             f"lab suite writes: it is not a gradmedic lab database: {_FIX}.")
                    rows.append(row)
            except sqlite3.DataError as error:  # SQLITE_TOOBIG: say which row, so that it can be deleted
                rowid = _oversized_row(db)
                if rowid is None:
                    raise
                raise GradmedicError(f"row {rowid} of {str(self.path)!r} holds a value over "
                                     f"{MAX_ROW_BYTES // 1024**2} MiB, larger than any lab run writes "
                                     f"({first_line(error)}); delete it (DELETE FROM runs WHERE rowid = {rowid}) "
                                     f"or {_FIX}.") from None
            return rows

        for name, key, config, result, wall in self._read(fetch):
            row = f"a row of {str(self.path)!r} ({str(name)[:60]!r}, {str(key)[:60]!r})"
            try:
                config, result, wall = json.loads(config), json.loads(result), float(wall)
            except RecursionError:
                raise GradmedicError(f"{row} is JSON nested too deeply to read (gradmedic's rows are "
                                     f"{MAX_ROW_DEPTH} deep at most); the database is damaged: delete the row or "
                                     f"use another --db path.") from None
            except (TypeError, ValueError) as error:
                raise GradmedicError(f"{row} is not JSON ({first_line(error)}); the database is damaged: delete "
                                     "the row or use another --db path.") from None
            if not isinstance(config, dict) or not isinstance(result, dict):
                raise GradmedicError(f"{row} holds {type(config).__name__}/{type(result).__name__} where a run's "
                                     "config and result objects belong; the database is damaged: delete the row "
                                     "or use another --db path.")
            if _depth(config) > MAX_ROW_DEPTH or _depth(result) > MAX_ROW_DEPTH:
                raise GradmedicError(f"{row} is JSON nested over {MAX_ROW_DEPTH} deep (gradmedic's rows are 4 deep); "
                                     "the database is damaged: delete the row or use another --db path.")
            yield name, config, result, wall

    def suites(self) -> list[str]:
        def names(db: sqlite3.Connection) -> list[str]:
            return [str(row[0]) for row in db.execute("SELECT DISTINCT suite FROM runs ORDER BY suite")]
        return self._read(names)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the database for one running suite. A second ``gradmedic lab run`` on the same file is
        refused with one line instead of doing every run again beside the first. The lock is the OS's
        (flock on ``<db>.lock``), so a process that dies, even by kill -9, releases it.

        The lock file is opened without following a symbolic link and must be a regular file of one link:
        we write our pid into it, and a link planted there (``lab.db.lock -> victim.txt``, or a hard link)
        would have had us truncate another file."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open_lock(lock_path)
        try:
            if not try_lock(handle):
                handle.seek(0)
                holder = handle.read(200).strip() or "another process"
                raise GradmedicError(f"{str(self.path)!r} is in use by another gradmedic lab run ({holder}); wait for "
                                     "it to finish (it saves every run it finishes) or give another --db path.")
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            handle.close()  # closing the file releases the lock


_SIDECARS = ("-wal", "-journal")
_WHY = {"trigger": "change or drop what is written", "view": "be a query that never ends"}


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """What tells that a database file changed: its identity, size and time, and its journal files."""
    try:
        st = path.stat()
        main: tuple[Any, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        main = ()
    return main, tuple(_sidecar(path, s).exists() for s in _SIDECARS)


def _oversized_row(db: sqlite3.Connection) -> int | None:
    """The rowid of the first row with a value over the length limit (only looked for once one was met)."""
    for (rowid,) in db.execute("SELECT rowid FROM runs").fetchall():
        try:
            db.execute("SELECT suite, key, config, result FROM runs WHERE rowid = ?", (rowid,)).fetchall()
        except sqlite3.DataError:
            return int(rowid)
    return None


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_ROW_DEPTH:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _explain(path: Path, error: sqlite3.Error, opened: bool) -> str:
    """What went wrong, in one line, from SQLite's error code (its message where Python < 3.11 lacks it).
    ``opened``: the database was opened before, so if it is gone now it was deleted or moved."""
    where = repr(str(path))
    detail = f"{type(error).__name__}: {first_line(error)}"
    code = getattr(error, "sqlite_errorname", "") or ""
    text = str(error).lower()

    def says(name: str, *words: str) -> bool:
        return code.startswith(name) or any(w in text for w in words)

    if opened and not path.exists():
        return (f"{where} no longer exists ({detail}): it was deleted or moved while in use; runs that had "
                "finished went with it. Run the same command again to start anew.")
    if says("SQLITE_FULL", "disk is full"):
        return (f"the disk holding {where} is full ({detail}); every run saved before is kept: free some space "
                "and run the same command again to resume.")
    if says("SQLITE_NOTADB", "file is not a database"):
        return f"{where} is not a gradmedic lab database: it is not an SQLite file ({detail}); {_FIX}."
    if says("SQLITE_CORRUPT", "malformed"):
        return f"{where} is damaged ({detail}); {_FIX} (sqlite3's .recover may save its rows)."
    if says("SQLITE_READONLY", "readonly"):
        return (f"{where} cannot be written: it or its directory is read-only ({detail}); make it writable or "
                f"{_FIX}.")
    if says("SQLITE_BUSY", "locked") or code.startswith("SQLITE_LOCKED"):
        return f"{where} is locked by another program ({detail}); wait for it to finish or {_FIX}."
    if says("SQLITE_INTERRUPT", "interrupted"):
        return (f"reading {where} took over {MAX_QUERY_S:g} s and was stopped; a lab database reads in well "
                f"under a second, so this one holds a query that does not end or sits on a stalled disk: {_FIX}.")
    if says("SQLITE_TOOBIG", "too big"):
        return (f"{where} holds a value over {MAX_ROW_BYTES // 1024**2} MiB, larger than any row of a lab run "
                f"({detail}); delete that row or {_FIX}.")
    if says("SQLITE_CANTOPEN", "unable to open"):
        return (f"cannot open {where} ({detail}): check that it and its directory exist and can be read (and "
                f"written, by lab run), or {_FIX}.")
    if says("SQLITE_IOERR", "disk i/o error"):
        return f"the disk failed while using {where} ({detail}); check the disk, then run the same command again."
    return f"{where} cannot be used as a gradmedic lab database ({detail}); {_FIX}."
