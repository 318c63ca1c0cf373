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


def test_demo_runs():
    done = run("demo", "--steps", "2", "--depth", "4")
    assert done.returncode == 0, done.stderr
    assert "vanishes" in done.stdout
