"""Small things a user reads: a missing matplotlib is one line everywhere a report is written, a sigmoid net's
finding says why it vanishes without saturating, a check's page has no "preset custom"."""

import sys

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.cli import main

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def sigmoid_trace(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Sigmoid())], nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, every=1)
    for _ in range(3):
        model(torch.randn(16, 8)).square().mean().backward()
        mon.step()
        opt.step()
        opt.zero_grad()
    return mon


@pytest.mark.parametrize("command", ["report", "check", "compare"])
def test_no_matplotlib_is_one_line_with_the_install_command(tmp_path, capsys, no_matplotlib, command):
    trace = sigmoid_trace(tmp_path).trace.save(tmp_path / "a.gmtrace")
    argv = {"report": ["report", str(trace), "-o", str(tmp_path / "r.html")],
            "check": ["check", f"{ROOT / 'examples' / 'sigmoid_mlp.py'}:build", "--report", str(tmp_path / "r.html")],
            "compare": ["report", str(trace), str(trace), "-o", str(tmp_path / "r.html")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "gradmedic: error: Reports need matplotlib: pip install 'gradmedic[report]'\n"


def test_no_matplotlib_at_the_end_of_training_is_one_line_and_training_ends(tmp_path, capsys, no_matplotlib):
    from gradmedic.integrations._common import REPORT_NAME, TRACE_NAME, finish_run

    finish_run(sigmoid_trace(tmp_path), tmp_path, report=True, verbose=True)
    out = capsys.readouterr().out
    assert "gradmedic: no HTML report: Reports need matplotlib: pip install 'gradmedic[report]'" in out
    assert (tmp_path / TRACE_NAME).is_file() and not (tmp_path / REPORT_NAME).exists()
    assert f", report {tmp_path / REPORT_NAME}" not in out


def test_sigmoid_finding_says_the_slope_is_at_most_a_quarter_when_units_do_not_saturate():
    from examples.sigmoid_mlp import build

    case = build()
    report = gm.check(case["model"], case["inputs"], targets=case["targets"], loss_fn=case["loss_fn"])
    assert max(report.trace.last("saturated_frac").values()) < 0.1  # the premise: nothing saturates here
    (found,) = report.of_kind("vanishing_gradients")
    assert "Sigmoid's slope is at most 0.25 even where its units are not saturated" in found.message
    # a tanh net gets no such sentence
    torch.manual_seed(0)
    tanh = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(32, 32), nn.Tanh())], nn.Linear(32, 10))
    for f in gm.check(tanh, case["inputs"]).findings:
        assert "Sigmoid's slope" not in f.message


def test_a_checks_page_does_not_say_preset_custom():
    from gradmedic.report import report_page

    torch.manual_seed(0)
    report = gm.check(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)), torch.randn(8, 4))
    assert report.trace.meta["preset"] == "custom"
    assert "preset" not in report_page(report, figures=False).html()
