"""The CLI contract under hostile input: factories that exit, are interrupted or print; names that are
markup; databases of another schema, damaged rows and impossible paths; help hints that name the command."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradmedic as gm
from gradmedic.cli import main
from tests.hostile_factories import HOSTILE, hostile_names

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = "tests/hostile_factories.py"


def cli(capfd, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's own exits
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("gradmedic:") and "Traceback" not in err


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


# --- factories that exit, are interrupted, print ------------------------------------------------------
@pytest.mark.parametrize("target,code,match", [
    (f"{FACTORIES}:exits_0", 2, "called sys.exit(0) instead of returning"),
    (f"{FACTORIES}:exits_3", 2, "called sys.exit(3)"),
    ("tests/hostile_exits_at_import.py:build", 2, "importing tests/hostile_exits_at_import.py called sys.exit(3)"),
    (f"{FACTORIES}:interrupted", 130, "interrupted"),
])
def test_a_factory_that_exits_or_is_interrupted_cannot_pass_a_ci_gate(capfd, target, code, match):
    got, out, err = cli(capfd, "check", target, "--fail-on", "warning")
    assert got == code and out == "" and one_line(err) and match in err, (got, out, err)


def test_a_printing_factory_and_model_leave_stdout_to_the_json():
    """The real console script: Python prints and raw writes to fd 1 go to stderr."""
    script = Path(sys.executable).parent / "gradmedic"
    done = subprocess.run([str(script), "check", f"{FACTORIES}:prints", "--json"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # nothing but the JSON: a stray line would make this raise
    assert set(doc) >= {"healthy", "findings"}
    assert "factory says hello" in done.stderr and "raw fd 1 says hello" in done.stderr
    assert "hello" not in done.stdout


# --- names are data ---------------------------------------------------------------------------------------
def test_hostile_names_print_as_themselves(capfd, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that rich does not fold the names
    case = hostile_names()
    report = gm.check(case["model"], case["inputs"], targets=case["targets"])
    text = str(report)
    for name in HOSTILE:
        assert f"layers.{name}.0" in text  # printed literally: no markup, no emoji, no crash
    trace = report.trace
    assert "layers.[/].0" in trace.summary()
    code, out, err = cli(capfd, "check", f"{FACTORIES}:hostile_names", "--report", str(tmp_path / "r.html"))
    assert code == 0 and "Traceback" not in err, err
    assert "layers.[bold red]x.0" in out and "layers.:thumbs_up:.0" in out
    assert (tmp_path / "r.html").stat().st_size > 10_000  # the figures were drawn


def test_plots_take_dollars_literally(tmp_path):
    import io

    from gradmedic.report import plots

    names = [f"layers.{n}" for n in HOSTILE]
    figures = [plots.gradient_heatmap([0, 1], names, torch.rand(2, len(names)).numpy(), title="a$b"),
               plots.layer_bars(names, {n: [1.0] * len(names) for n in HOSTILE[:2]}),
               plots.time_curves({n: [1.0, 0.5] for n in HOSTILE}, title="$x$ and $"),
               plots.loss_curves({n: ([0, 1], [1.0, 0.5]) for n in HOSTILE})]
    for figure in figures:
        figure.savefig(io.BytesIO(), format="png")  # mathtext would raise on a$\frac{1}{$
        texts = [t.get_text() for t in figure.findobj(lambda o: hasattr(o, "get_text"))]
        named = [t for t in texts if "frac" in t]
        assert named and all("\\$" in t and t.count("$") == t.count("\\$") for t in named), named


# --- databases from elsewhere ----------------------------------------------------------------------------
def _other_schema(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (a INTEGER, b TEXT)")
        db.execute("INSERT INTO runs VALUES (1, 'x')")
    return path


def _damaged_rows(path: Path) -> Path:
    from gradmedic.lab import Store

    Store(path).put("smoke", {"experiment": "x", "label": "y", "seed": 0}, {"final_loss": 1.0}, 1.0)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET result = 'not json {'")
    return path


@pytest.mark.parametrize("make,command,match", [
    (_other_schema, "lab", "of another schema"),
    (_other_schema, "report", "of another schema"),
    (_damaged_rows, "report", "is not JSON"),
    (lambda p: p / "a file" / "lab.db", "lab", "cannot create the database"),
    (lambda p: p / "a file" / "deeper" / "lab.db", "lab", "cannot create the database"),
    (lambda p: p, "lab", "is a directory"),
])
def test_a_database_from_elsewhere_is_one_line(capfd, tmp_path, make, command, match):
    (tmp_path / "a file").write_text("not a directory")
    db = make(tmp_path / "lab.db") if make in (_other_schema, _damaged_rows) else make(tmp_path)
    args = ["lab", "run", "smoke", "--db", str(db), "--no-progress"] if command == "lab" else \
        ["report", str(db), "-o", str(tmp_path / "r.html")]
    code, out, err = cli(capfd, *args)
    assert code == 2 and one_line(err) and match in err, (code, err)


# --- help hints -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,hint", [
    (["--nope"], "(see gradmedic --help)"),
    (["check"], "(see gradmedic check --help)"),
    (["lab", "run"], "(see gradmedic lab run --help)"),
    (["lab", "run", "smoke", "--workers", "0"], "(see gradmedic lab run --help)"),
])
def test_help_hints_name_the_command(capfd, args, hint):
    code, out, err = cli(capfd, *args)
    assert code == 2 and one_line(err) and hint in err, err
