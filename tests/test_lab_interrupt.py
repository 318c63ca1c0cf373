"""The lab when it is interrupted: kill -9 of the parent, Ctrl-C (also during start-up), two runs on one
database, and evidence that does not depend on which run finished first.

Each test drives the real command (``gradmedic.cli.main``) in a subprocess, with a suite of its own
registered beside the built-in ones, and finds the worker processes through /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradmedic.lab import Store
from gradmedic.lab.store import run_key
from tests.helpers import children_of

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")]

ROOT = Path(__file__).resolve().parents[1]

# Two short runs, then long ones (minutes each on a shared CPU): an interrupted suite has finished
# results to keep and runs in flight that it must not wait for.
SCRIPT = textwrap.dedent("""
    import signal, sys
    # a terminal's Ctrl-C reaches a process that has not ignored SIGINT; a test suite started as a background
    # job (bash's `cmd &`, nohup) passes SIGINT ignored down to its children, and Python keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from gradmedic.cli import main
    from gradmedic.lab import Experiment, Suite
    from gradmedic.lab.suites import SUITES
    short = [(f"short {i}", {"model": "mlp", "spec": {"depth": 2, "width": 16}, "steps": 5, "lr": 1e-3 * (i + 1)})
             for i in range(int(sys.argv[2]))]
    long = [(f"long {i}", {"model": "mlp", "spec": {"depth": 8, "width": 256}, "steps": 100000, "lr": 1e-4 * (i + 1)})
            for i in range(4)]
    SUITES["stop"] = Suite("stop", "interruptions", (Experiment("stop", "runs to interrupt", tuple(short + long)),))
    if __name__ == "__main__":
        sys.exit(main(["lab", "run", "stop", "--db", sys.argv[1], "--workers", "2", "--no-progress"]))
""")


def _start(tmp_path, short: int = 2, db: Path | None = None) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "stop_suite.py"
    script.write_text(SCRIPT)
    db = db or tmp_path / "lab.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(short)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    return proc, db


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _wait_for(condition, timeout: float = 180.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(proc) -> dict[int, str]:
    return {pid: cmd for pid, cmd in children_of(proc.pid).items() if "spawn_main" in cmd}


def _saved(db: Path) -> int:
    return len(Store(db).finished("stop")) if db.exists() else 0


def _stop(proc, family=()) -> None:
    """Kill what a test started, also when it failed: its process group (it has its own session) and the
    workers it saw (reparented if their parent is gone)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in _alive(family):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=30)


def test_kill_9_of_the_parent_leaves_no_worker_alive(tmp_path):
    proc, db = _start(tmp_path)
    family: dict[int, str] = {}
    try:
        _wait_for(lambda: _saved(db) >= 1 and len(_workers(proc)) == 2, what="two workers and a saved run")
        family = children_of(proc.pid)  # the workers and multiprocessing's resource tracker
        assert any("resource_tracker" in cmd for cmd in family.values()) or len(family) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 5  # the workers poll every 0.5 s where the kernel does not kill them
        while _alive(family) and time.time() < deadline:
            time.sleep(0.05)
        assert _alive(family) == [], {pid: family[pid] for pid in _alive(family)}
    finally:
        _stop(proc, family)


def test_ctrl_c_keeps_what_finished_and_does_not_wait_for_runs_in_flight(tmp_path):
    proc, db = _start(tmp_path)
    family: dict[int, str] = {}
    try:
        _wait_for(lambda: _saved(db) >= 2 and len(_workers(proc)) == 2, what="the short runs")
        family = children_of(proc.pid)
        time.sleep(0.5)  # the long runs are in flight now
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        out, err = proc.communicate(timeout=60)  # a long run would take minutes: it was not waited for
    finally:
        _stop(proc, family)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted; 2 finished runs of 'stop' are saved" in err, err
    assert "Traceback" not in err and out == ""
    assert _saved(db) == 2
    deadline = time.time() + 5
    while _alive(family) and time.time() < deadline:
        time.sleep(0.05)
    assert _alive(family) == []


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc, db = _start(tmp_path, short=0)
    try:
        # both workers exist and are importing torch (seconds); the parent has left the few milliseconds in
        # which it starts them with SIGINT ignored (a Ctrl-C inside those can be lost: press it again)
        _wait_for(lambda: len(_workers(proc)) == 2, what="the workers")
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("gradmedic: interrupted"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_second_lab_run_on_the_same_database_is_refused_in_one_line(tmp_path):
    first, db = _start(tmp_path)
    second = None
    try:
        _wait_for(lambda: len(_workers(first)) == 2, what="the first run's workers")
        second, _ = _start(tmp_path, db=db)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert err.count("\n") == 1 and "is in use by another gradmedic lab run (pid" in err, err
        assert _saved(db) <= 2  # the second did no run of its own
    finally:
        _stop(first)
        if second is not None:
            _stop(second)
    with Store(db).exclusive():  # kill -9 of the holder released the lock
        pass


def test_results_and_claim_rows_do_not_depend_on_completion_order(tmp_path):
    from gradmedic._cli_commands import in_suite_order as _in_suite_order
    from gradmedic.lab.suites import get_suite

    suite = get_suite("smoke")
    configs = suite.configs[:12]
    results = [{"final_loss": float(i), "i": i} for i in range(len(configs))]
    forward, backward = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    for config, result in zip(configs, results, strict=True):
        forward.put("smoke", config, result, 1.0)
    for config, result in reversed(list(zip(configs, results, strict=True))):
        backward.put("smoke", config, result, 1.0)
    rows_a, rows_b = list(forward.results("smoke")), list(backward.results("smoke"))
    assert rows_a == rows_b
    ordered = _in_suite_order(suite.configs, rows_b)
    assert [run_key(c) for c, _ in ordered] == [run_key(c) for c in configs]


@pytest.mark.parametrize("group", [False, True], ids=["parent", "process-group"])
def test_sigterm_stops_at_once_and_says_what_was_kept(tmp_path, group):
    """SIGTERM is what systemd, Kubernetes and SLURM send first (to the main process, or to all of them): it
    stops the suite as Ctrl-C does, without waiting for runs in flight, and says what was kept."""
    proc, db = _start(tmp_path)
    family: dict[int, str] = {}
    try:
        _wait_for(lambda: _saved(db) >= 2 and len(_workers(proc)) == 2, what="the short runs")
        family = children_of(proc.pid)
        time.sleep(0.5)  # the long runs are in flight now
        sent = time.time()
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        _stop(proc, family)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert err.count("\n") == 1 and "terminated (SIGTERM); 2 finished runs of 'stop' are saved" in err, err
    assert "Traceback" not in err and out == ""
    assert took < 15, took  # a long run takes minutes: it was not waited for
    assert _saved(db) == 2
    deadline = time.time() + 5
    while _alive(family) and time.time() < deadline:
        time.sleep(0.05)
    assert _alive(family) == []
