"""The suite runner: worker processes, resume, and no lost or half-written result when a worker dies."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradmedic.lab import Experiment, Store, Suite, run_suite
from tests.helpers import children_of

TINY = {"model": "mlp", "spec": {"depth": 2, "width": 16}, "steps": 5}


def tiny_suite(n=4, extra=()):
    runs = tuple((f"run {i}", {**TINY, "lr": 1e-3 * (i + 1)}) for i in range(n)) + tuple(extra)
    return Suite("tiny", "test", (Experiment("tiny", "tiny runs", runs),))


def test_runs_everything_then_skips_it(tmp_path):
    store = Store(tmp_path / "lab.db")
    first = run_suite(tiny_suite(), store, workers=2, progress=False)
    assert (first.total, first.skipped, first.finished, first.failed) == (4, 0, 4, [])
    again = run_suite(tiny_suite(), store, workers=2, progress=False)
    assert (again.skipped, again.finished) == (4, 0)
    rows = list(store.results("tiny"))
    assert len(rows) == 4 and all(r["final_loss"] is not None for _, _, r, _ in rows)


def test_a_failing_run_is_reported_and_the_others_are_kept(tmp_path):
    store = Store(tmp_path / "lab.db")
    summary = run_suite(tiny_suite(2, extra=[("bad", {**TINY, "task": "mnist"})]), store, workers=2, progress=False)
    assert summary.finished == 2 and len(summary.failed) == 1
    name, error = summary.failed[0]
    assert "bad" in name and "Argument task" in error and "\n" not in error
    assert not summary.complete and len(store.finished("tiny")) == 2


def test_only_runs_the_selected_runs_and_a_later_call_runs_the_rest(tmp_path):
    store = Store(tmp_path / "lab.db")
    some = run_suite(tiny_suite(), store, workers=1, progress=False, only=("tiny: run [02] (*",))
    assert (some.total, some.finished) == (2, 2)
    assert sorted(c["label"] for _, c, _, _ in store.results("tiny")) == ["run 0", "run 2"]
    rest = run_suite(tiny_suite(), store, workers=1, progress=False)
    assert (rest.total, rest.skipped, rest.finished) == (4, 2, 2)


def test_a_pattern_that_matches_no_run_is_refused_before_anything_runs(tmp_path):
    from gradmedic import GradmedicError

    store = Store(tmp_path / "lab.db")
    refused = r"No run of suite 'tiny' matches 'tiny: run 9\*'.*'tiny: run 0 \(seed 0\)'"
    with pytest.raises(GradmedicError, match=refused):
        run_suite(tiny_suite(), store, workers=1, progress=False, only=("tiny: run 0 (*", "tiny: run 9*"))
    assert not store.finished("tiny")


def test_bad_workers_is_a_clear_error(tmp_path):
    from gradmedic import GradmedicError

    with pytest.raises(GradmedicError, match="Argument workers"):
        run_suite(tiny_suite(), Store(tmp_path / "lab.db"), workers=0)


SCRIPT = textwrap.dedent("""
    import sys
    from gradmedic.lab import Experiment, Store, Suite, run_suite
    from gradmedic import GradmedicError
    runs = tuple((f"run {i}", {"model": "mlp", "spec": {"depth": 8, "width": 64}, "steps": 300, "lr": 1e-4 * (i + 1)})
                 for i in range(12))
    suite = Suite("kill", "test", (Experiment("kill", "runs to kill", runs),))
    if __name__ == "__main__":
        try:
            summary = run_suite(suite, Store(sys.argv[1]), workers=2, progress=False)
        except GradmedicError as error:
            print(error, file=sys.stderr)
            sys.exit(3)
        print(summary.skipped, summary.finished, len(summary.failed))
""")


def _workers_of(pid):
    """The pool's worker processes (spawned children running spawn_main) of ``pid``."""
    return [child for child, cmd in children_of(pid).items() if "spawn_main" in cmd]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_killing_a_worker_mid_suite_loses_nothing_and_a_rerun_resumes(tmp_path):
    script, db = tmp_path / "suite.py", tmp_path / "lab.db"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        store = None
        while time.time() < deadline:  # wait until some runs are stored, then kill a worker mid-run
            if db.exists():
                store = store or Store(db)
                if len(store.finished("kill")) >= 2:
                    break
            time.sleep(0.05)
        workers = _workers_of(proc.pid)
        assert workers, "no worker process found"
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = Store(db).finished("kill")
    assert proc.returncode == 3, (out, err)
    assert "worker process died" in err and "Run the same command again" in err
    assert 2 <= len(saved) < 12
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        before = dict(con.execute("SELECT key, finished FROM runs"))
        assert all(len(r) > 100 for (r,) in con.execute("SELECT result FROM runs"))  # whole JSON rows only

    done = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    skipped, finished, failed = map(int, done.stdout.split())
    assert (skipped, finished, failed) == (len(saved), 12 - len(saved), 0)
    with sqlite3.connect(db) as con:
        after = dict(con.execute("SELECT key, finished FROM runs"))
    assert len(after) == 12 and all(after[k] == t for k, t in before.items())  # the saved runs were not redone
