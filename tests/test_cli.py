"""The real ``gradmedic`` console script: exit codes, JSON, one-line errors."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import gradmedic as gm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "gradmedic"


def run(*args, cwd=ROOT):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def test_healthy_example_passes_fail_on_warning():
    done = run("check", "examples/resnet_cnn.py:build", "--fail-on", "warning")
    assert done.returncode == 0, done.stderr
    assert "healthy" in done.stdout


@pytest.mark.parametrize("example,kind", [("sigmoid_mlp", "vanishing_gradients"), ("dead_relu", "dead_units"),
                                          ("tanh_rnn", "vanishing_through_time"),
                                          ("exploding_mlp", "exploding_gradients")])
def test_sick_examples_fail_on_error(example, kind):
    done = run("check", f"examples/{example}.py:build", "--fail-on", "error")
    assert done.returncode == 1, done.stderr
    assert kind in done.stdout
    assert run("check", f"examples/{example}.py:build").returncode == 0  # findings alone exit 0


def test_json_is_exactly_report_to_json():
    done = run("check", "examples/sigmoid_mlp.py:build", "--json", "--steps", "1")
    assert done.returncode == 0, done.stderr
    case = load_example("sigmoid_mlp")
    report = gm.check(case["model"], case["inputs"], targets=case["targets"], loss_fn=case["loss_fn"], steps=1)
    assert done.stdout == report.to_json() + "\n"


@pytest.mark.parametrize("args,match", [
    (["check", "nowhere.py:build"], "no such file: nowhere.py"),
    (["check", "examples:build"], "examples is a folder: give a Python file and a function"),
    (["check", "examples/sigmoid_mlp.py:build", "--report", "README.md/out.html"],
     "README.md is a file, not a folder"),
    (["check", "examples/sigmoid_mlp.py:build", "--report", "examples"], "it is a folder; give a file name"),
    (["check", "examples/sigmoid_mlp.py:nothing"], "has no function 'nothing'"),
    (["check", "examples/sigmoid_mlp.py"], "should be FILE.py:FUNCTION"),
    (["check", "tests/cli_factories.py:raises"], "raises() raised RuntimeError: broken factory"),
    (["check", "tests/cli_factories.py:not_a_dict"], "should return a dict with 'model' and 'inputs'"),
    (["check", "tests/cli_factories.py:wrong_shape"], "forward failed on these inputs"),
    (["check", "examples/sigmoid_mlp.py:build", "--steps", "-3"], "non-negative integer"),
    (["check", "examples/sigmoid_mlp.py:build", "--fail-on", "info"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(args, match):
    done = run(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmedic: error:"), done.stderr
    assert match in lines[0]
    assert "Traceback" not in done.stderr


def test_demo_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "demo.html"
    done = run("demo", "--steps", "20", "--depth", "6", "--report", str(out))
    assert done.returncode == 0, done.stderr
    assert "vanishing_gradients" in done.stdout and "treated model" in done.stdout
    # the sick run (heatmap, per-layer bars, loss) + before/after (loss curves, per-layer bars)
    assert out.read_text().count("<img ") == 5


def test_lab_list_json():
    import json

    done = run("lab", "list", "--json")
    assert done.returncode == 0, done.stderr
    suites = json.loads(done.stdout)
    assert {"smoke", "quick", "full"} <= set(suites) and suites["quick"]["runs"] > 40


@pytest.mark.parametrize("args,match", [
    (("lab", "run", "nope"), "No lab suite 'nope'"),
    (("lab", "run", "smoke", "--workers", "0"), "--workers"),
    (("lab", "run", "smoke", "--only", "nielsen: tanh*"), "No run of suite 'smoke' matches 'nielsen: tanh*'"),
    (("report", "missing.db", "-o", "x.html"), "no such file"),
    (("report", "README.md", "-o", "x.html"), "neither a lab database"),
    (("lab", "publish", "missing.db"), "no such lab database"),
])
def test_lab_and_report_bad_input_is_one_line(args, match, tmp_path):
    done = run(*args, cwd=tmp_path if args[0] == "lab" else ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_check_report_and_trace_report(tmp_path):
    page = tmp_path / "check.html"
    done = run("check", "examples/tanh_rnn.py:build", "--report", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "vanishing_through_time" in text and "data:image/png;base64," in text
    model, x = load_example("sigmoid_mlp")["model"], load_example("sigmoid_mlp")["inputs"]
    with gm.Monitor(model, preset="full") as monitor:
        for _ in range(3):
            model(x).square().mean().backward()
            monitor.step()
    trace_path = monitor.trace.save(tmp_path / "run.gmtrace")
    done = run("report", str(trace_path), "-o", str(tmp_path / "trace.html"))
    assert done.returncode == 0, done.stderr
    html = (tmp_path / "trace.html").read_text()
    assert "vanishing_gradients" in html
    assert f"gradmedic report: Sequential ({tmp_path.name}/run.gmtrace)" in html  # which model, which run


def test_lab_run_smoke_json_then_resume(tmp_path):
    import json

    db = tmp_path / "lab.db"
    done = run("lab", "run", "smoke", "--db", str(db), "--workers", "2", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["runs"], doc["finished"], doc["failed"]) == (54, 54, [])
    # smoke's budgets only run the code paths: no claim gets a verdict from them (was: 10 of 19 "not supported")
    assert {c["verdict"] for c in doc["claims"]} == {"not tested at this budget"}
    assert len(doc["claims"]) == 19  # every claim but the copy task's and the 100-layer transformer's (full only)
    assert all(c["summary"].startswith(c["verdict"]) for c in doc["claims"])
    again = json.loads(run("lab", "run", "smoke", "--db", str(db), "--json").stdout)
    assert (again["skipped"], again["finished"]) == (54, 0) and again["claims"] == doc["claims"]
    page = tmp_path / "README.md"
    page.write_text("# x\n\nbefore\n<!-- gradmedic-lab:claims:begin -->\nold\n"
                    "<!-- gradmedic-lab:claims:end -->\nafter\n")
    done = run("lab", "publish", str(db), str(page), "--suite", "smoke")
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "before" in text and "after" in text and "old" not in text and "seeds [0]" in text
    assert "CPU capability" in text and text.count("| **") == 19
    done = run("lab", "publish", str(db), str(page), "--suite", "quick")
    assert done.returncode == 2 and "no results of suite 'quick'" in done.stderr
    done = run("report", str(db), "-o", str(tmp_path / "lab.html"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lab.html").read_text().count("<img ") >= 13 * 2


def test_piped_check_shows_whole_layer_names():
    import os

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(f"'{SCRIPT}' check tests/cli_factories.py:transformer | cat", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    rows = {line.split("│")[1].strip() for line in done.stdout.splitlines() if line.count("│") > 2}
    for block in (0, 11):
        for leaf in ("self_attn", "self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
            assert f"encoder.layers.{block}.{leaf}" in rows  # one cell, the whole name


def test_python_dash_m_gradmedic_is_the_same_command_line():
    done = subprocess.run([sys.executable, "-m", "gradmedic", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and gm.__version__ in done.stdout
