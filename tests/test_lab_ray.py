"""The lab on Ray (a local instance): a suite killed mid-way by SIGKILL of its driver resumes with no
finished run lost or redone, and its claims equal the process pool's on the same suite."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from gradmedic.lab import Store, run_suite  # noqa: E402
from gradmedic.lab.claims import group_results, judge  # noqa: E402
from gradmedic.lab.store import run_key  # noqa: E402
from gradmedic.lab.suites import get_suite  # noqa: E402

DRIVER = textwrap.dedent("""
    import sys
    from gradmedic.lab import Store, run_suite
    from gradmedic.lab.suites import get_suite
    summary = run_suite(get_suite("smoke"), Store(sys.argv[1]), workers=2, progress=False, backend="ray")
    print(summary.skipped, summary.finished, len(summary.failed))
""")


def claims(db):
    rows = sorted(((c, r) for _, c, r, _ in Store(db).results("smoke")), key=lambda cr: run_key(cr[0]))
    return judge(group_results(rows))


def test_ray_suite_resumes_after_its_driver_is_killed_and_matches_the_process_pool(tmp_path):
    script, db = tmp_path / "driver.py", tmp_path / "ray.db"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.time() + 150
        store = None
        while time.time() < deadline:  # wait until some runs are stored, then kill the driver
            if db.exists():
                store = store or Store(db)
                if len(store.finished("smoke")) >= 4:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    total = len(get_suite("smoke").configs)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        before = dict(con.execute("SELECT key, finished FROM runs"))
    assert 4 <= len(before) < total

    done = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped, finished, failed = map(int, done.stdout.split()[-3:])
    assert (skipped, finished, failed) == (len(before), total - len(before), 0)
    with sqlite3.connect(db) as con:
        after = dict(con.execute("SELECT key, finished FROM runs"))
    assert len(after) == total and all(after[k] == t for k, t in before.items())  # none lost, none redone

    pool = tmp_path / "pool.db"
    run_suite(get_suite("smoke"), Store(pool), workers=2, progress=False)
    assert claims(db) == claims(pool)  # one thread per run: the same numbers wherever a run executes
