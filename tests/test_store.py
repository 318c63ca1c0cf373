"""The lab store: resumable, atomic per run, and intact after a kill -9 in the middle of writing."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gradmedic as gm
from gradmedic.lab.store import Store, run_key

ROOT = Path(__file__).resolve().parents[1]


def test_put_finished_and_results(tmp_path):
    store = Store(tmp_path / "lab.sqlite")
    a, b = {"depth": 10, "act": "relu", "seed": 0}, {"act": "relu", "depth": 10, "seed": 1}
    store.put("quick", a, {"loss": 0.5, "curve": [1.0, 0.5]}, wall_s=1.5)
    assert store.finished("quick") == {run_key(a)}
    assert run_key({"seed": 0, "act": "relu", "depth": 10}) == run_key(a)  # key order does not matter
    store.put("quick", b, {"loss": float("nan")}, wall_s=2.0)
    store.put("quick", a, {"loss": 0.25}, wall_s=1.0)  # a rerun replaces, never duplicates
    rows = list(Store(tmp_path / "lab.sqlite").results("quick"))  # a new handle sees everything
    assert len(rows) == 2
    by_seed = {config["seed"]: result for _, config, result, _ in rows}
    assert by_seed[0] == {"loss": 0.25}
    assert store.suites() == ["quick"]


def test_bad_inputs(tmp_path):
    with pytest.raises(gm.GradmedicError, match="plain JSON"):
        run_key({"model": object()})
    bad = tmp_path / "not.sqlite"
    bad.write_bytes(b"this is not a database, just bytes" * 100)
    with pytest.raises(gm.GradmedicError, match="not a gradmedic lab database"):
        Store(bad)


WRITER = """
import sys, time
from gradmedic.lab.store import Store
store = Store(sys.argv[1])
i = 0
while True:  # keep writing sizeable results until killed
    store.put("stress", {"i": i}, {"curve": list(range(5000)), "i": i}, wall_s=0.0)
    print(i, flush=True)
    i += 1
"""


def test_kill_minus_9_loses_no_finished_result_and_leaves_no_half_row(tmp_path):
    db = tmp_path / "lab.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    reported = []
    deadline = time.time() + 60
    while len(reported) < 30 and time.time() < deadline:
        line = proc.stdout.readline()
        if line:
            reported.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)  # mid-write, as likely as not
    proc.wait()
    assert len(reported) >= 30
    rows = list(Store(db).results("stress"))
    stored = {config["i"] for _, config, _, _ in rows}
    assert set(reported) <= stored  # every result reported as written survived
    for _, config, result, _ in rows:  # and every row is whole
        assert result["i"] == config["i"] and len(result["curve"]) == 5000
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    json.dumps([r[2] for r in rows])
