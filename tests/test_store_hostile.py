"""Lab databases and lock files from elsewhere: nothing the user only reads is written, no file is clobbered
through a link, nothing hangs or fills memory, and what went wrong is said in one line, as it was."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

import gradmedic as gm
from gradmedic.cli import main
from gradmedic.lab import store as store_module
from gradmedic.lab.store import MAX_ROW_BYTES, Store

ROOT = Path(__file__).resolve().parents[1]
ROW = {"experiment": "capacity", "label": "baseline", "seed": 0}


def cli(capfd, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("gradmedic:") and "Traceback" not in err


def _result(**extra) -> dict:
    """A result with every field the claims and the report read, small."""
    return {"baseline": 2.3, "final_loss": 0.5, "curve": {"steps": [0, 1], "loss": [2.3, 0.5]},
            "gradients": {"layers": ["0"], "steps": [0], "grad_norm": [[1.0]]}, "time": {}, "wall_s": 0.1, **extra}


def _lab_db(path: Path, rows=((ROW, None),)) -> Path:
    store = Store(path)
    for config, result in rows:
        store.put("smoke", config, result or _result(), 0.1)
    return path


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _raw(path: Path, *statements: str, args=()) -> None:
    db = sqlite3.connect(path)
    with db:
        for statement in statements:
            db.execute(statement, args if "?" in statement else ())
    db.close()


# --- 1. the lock file is never followed ----------------------------------------------------------------
@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_link_at_the_lock_file_is_refused_and_its_target_left_alone(capfd, tmp_path, link):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    db = tmp_path / "lab.db"
    lock = tmp_path / "lab.db.lock"
    lock.symlink_to(victim) if link == "symbolic" else os.link(victim, lock)
    code, out, err = cli(capfd, "lab", "run", "smoke", "--db", str(db), "--no-progress")
    assert code == 2 and one_line(err) and "lock file" in err and f"{link} link" in err.replace("hard links",
                                                                                                  "hard link"), err
    assert victim.read_text() == "precious"


def test_a_fifo_at_the_lock_file_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "lab.db.lock")
    with pytest.raises(gm.GradmedicError, match="not a regular file"), Store(tmp_path / "lab.db").exclusive():
        pass


# --- 3. reading changes nothing ------------------------------------------------------------------------
def test_report_of_a_lab_database_changes_no_byte_and_leaves_no_file(capfd, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = _lab_db(data / "lab.db")
    before = _snapshot(data)
    code, out, err = cli(capfd, "report", str(db), "-o", str(tmp_path / "r.html"))
    assert code == 0, err
    assert _snapshot(data) == before  # no byte changed, no -wal or -shm left beside it


def test_report_of_an_sqlite_file_from_elsewhere_adds_no_table_and_keeps_its_journal(capfd, tmp_path):
    db = tmp_path / "X.sqlite"
    _raw(db, "CREATE TABLE people (name TEXT)", "INSERT INTO people VALUES ('ada')")
    before = _snapshot(tmp_path)
    code, out, err = cli(capfd, "report", str(db), "-o", str(tmp_path / "r.html"))
    assert code == 2 and one_line(err) and "no table 'runs'" in err and "'people'" in err, err
    assert _snapshot(tmp_path) == before
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [r[0] for r in raw.execute("SELECT name FROM sqlite_master")] == ["people"]


def test_lab_run_on_an_sqlite_file_from_elsewhere_changes_nothing(capfd, tmp_path):
    db = tmp_path / "X.sqlite"
    _raw(db, "CREATE TABLE people (name TEXT)")
    before = _snapshot(tmp_path)
    code, out, err = cli(capfd, "lab", "run", "smoke", "--db", str(db), "--no-progress")
    assert code == 2 and one_line(err) and "no table 'runs'" in err and "nothing was changed" in err, err
    assert _snapshot(tmp_path) == before


def test_a_read_beside_a_running_writer_sees_what_it_committed(tmp_path):
    """While ``lab run`` holds the database open its committed rows may still sit in the -wal file: a read
    then goes through SQLite's locks (mode=ro), not the immutable snapshot of the main file."""
    db = _lab_db(tmp_path / "lab.db")
    writer = Store(db)
    holder = sqlite3.connect(db)  # kept open: the -wal file is not checkpointed away
    try:
        holder.execute("SELECT count(*) FROM runs").fetchall()
        writer.put("smoke", {**ROW, "seed": 1}, _result(), 0.1)
        assert (tmp_path / "lab.db-wal").exists()
        assert sorted(c["seed"] for _, c, _, _ in Store(db, readonly=True).results("smoke")) == [0, 1]
    finally:
        holder.close()


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="needs a directory that is read-only to us (not root)")
def test_a_lab_database_in_a_read_only_directory_can_be_reported(capfd, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = _lab_db(data / "lab.db")
    data.chmod(0o555)
    try:
        code, out, err = cli(capfd, "report", str(db), "-o", str(tmp_path / "r.html"))
    finally:
        data.chmod(0o755)
    assert code == 0, err


# --- 4. what is written is there, or the schema is refused ---------------------------------------------
TRIGGER = "CREATE TRIGGER swallow AFTER INSERT ON runs BEGIN DELETE FROM runs WHERE rowid = new.rowid; END"


def test_lab_run_refuses_a_database_with_a_trigger(capfd, tmp_path):
    db = tmp_path / "lab.db"
    Store(db)
    _raw(db, TRIGGER)
    code, out, err = cli(capfd, "lab", "run", "smoke", "--db", str(db), "--no-progress")
    assert code == 2 and one_line(err) and "triggers ('swallow')" in err, err


def test_a_row_the_database_does_not_keep_is_an_error_not_a_finished_run(tmp_path):
    db = tmp_path / "lab.db"
    store = Store(db)
    _raw(db, TRIGGER)  # appears after the schema was checked: another program, mid-run
    with pytest.raises(gm.GradmedicError, match="did not keep the result just written"):
        store.put("smoke", ROW, _result(), 0.1)


# --- 7. reads bounded in time and size -----------------------------------------------------------------
def test_a_view_named_runs_that_never_ends_is_refused_at_once(capfd, tmp_path):
    db = tmp_path / "lab.db"
    _raw(db, "CREATE VIEW runs AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
             "SELECT 's' AS suite, i AS key, '{}' AS config, '{}' AS result, 0.0 AS wall_s, 0.0 AS finished FROM n")
    code, out, err = cli(capfd, "report", str(db), "-o", str(tmp_path / "r.html"))
    assert code == 2 and one_line(err) and "views ('runs')" in err, err


def test_a_query_that_does_not_end_is_stopped_after_the_time_limit(tmp_path, monkeypatch):
    store = Store(_lab_db(tmp_path / "lab.db"), readonly=True)
    monkeypatch.setattr(store_module, "MAX_QUERY_S", 0.2)
    forever = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT max(i) FROM n"
    with pytest.raises(gm.GradmedicError, match=r"took over 0.2 s and was stopped"):
        store._read(lambda db: db.execute(forever).fetchall())


def test_a_row_over_the_size_limit_is_refused_before_it_is_read(capfd, tmp_path):
    db = _lab_db(tmp_path / "lab.db")
    big = json.dumps(_result(padding="x" * (MAX_ROW_BYTES + 1024)))
    _raw(db, "UPDATE runs SET result = ?", args=(big,))
    code, out, err = cli(capfd, "report", str(db), "-o", str(tmp_path / "r.html"))
    assert code == 2 and one_line(err) and f"row 1 of {str(db)!r} holds a value over {MAX_ROW_BYTES // 1024**2} MiB" \
        in err and "DELETE FROM runs WHERE rowid = 1" in err, err


def test_a_read_over_the_total_limit_is_refused(tmp_path, monkeypatch):
    rows = [({**ROW, "seed": s}, _result(padding="x" * 600_000)) for s in range(3)]
    store = Store(_lab_db(tmp_path / "lab.db", rows), readonly=True)
    monkeypatch.setattr(store_module, "MAX_READ_BYTES", 1024**2)
    with pytest.raises(gm.GradmedicError, match="holds over 1 MiB of results"):
        list(store.results("smoke"))


# --- 12. what really went wrong ------------------------------------------------------------------------
def test_a_full_disk_is_said_as_such(tmp_path, monkeypatch):
    store = Store(tmp_path / "lab.db")
    _connect_then(monkeypatch, "PRAGMA max_page_count = 8")  # SQLite's own SQLITE_FULL, as from a full disk
    with pytest.raises(gm.GradmedicError) as caught:
        store.put("smoke", ROW, _result(padding="x" * 200_000), 0.1)
    message = str(caught.value)
    assert "is full" in message and "free some space" in message
    assert "not a gradmedic lab database" not in message


def test_a_database_deleted_during_a_suite_is_said_as_such_and_not_recreated_empty(tmp_path):
    db = tmp_path / "lab.db"
    store = Store(db)
    store.put("smoke", ROW, _result(), 0.1)
    for path in tmp_path.iterdir():
        path.unlink()
    with pytest.raises(gm.GradmedicError) as caught:
        store.put("smoke", {**ROW, "seed": 1}, _result(), 0.1)
    message = str(caught.value)
    assert "no longer exists" in message and "deleted or moved" in message, message
    assert "not a gradmedic lab database" not in message
    assert not db.exists()


def test_bytes_that_are_not_sqlite_are_said_as_such(tmp_path):
    bad = tmp_path / "not.sqlite"
    bad.write_bytes(b"this is not a database, just bytes" * 100)
    for readonly in (False, True):
        with pytest.raises(gm.GradmedicError, match="not a gradmedic lab database: it is not an SQLite file"):
            Store(bad, readonly=readonly)
    assert bad.read_bytes() == b"this is not a database, just bytes" * 100


def _connect_then(monkeypatch, *pragmas: str) -> None:
    """Every connection of the Store runs ``pragmas`` first: SQLite's own errors, as from the real cause."""
    connect = Store._connect

    def patched(self, *args, **kwargs):
        db = connect(self, *args, **kwargs)
        for pragma in pragmas:
            db.execute(pragma)
        return db

    monkeypatch.setattr(Store, "_connect", patched)


def test_a_read_only_database_is_said_as_such(tmp_path, monkeypatch):
    store = Store(tmp_path / "lab.db")
    _connect_then(monkeypatch, "PRAGMA query_only = 1")  # SQLITE_READONLY, as on a read-only mount
    with pytest.raises(gm.GradmedicError) as caught:
        store.put("smoke", ROW, _result(), 0.1)
    message = str(caught.value)
    assert "cannot be written: it or its directory is read-only" in message, message
    assert "not a gradmedic lab database" not in message


def test_a_database_locked_by_another_program_is_said_as_such(tmp_path, monkeypatch):
    db = tmp_path / "lab.db"
    store = Store(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        _connect_then(monkeypatch, "PRAGMA busy_timeout = 50")
        with pytest.raises(gm.GradmedicError) as caught:
            store.put("smoke", ROW, _result(), 0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(caught.value)
    assert "is locked by another program" in message, message
    assert "not a gradmedic lab database" not in message
