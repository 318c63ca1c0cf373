"""Progress on the long calls: drawn on a terminal only, after a delay, one bar at a time; and the end of a
training run prints the verdict and the findings, the per-layer table going to a file."""

import io

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic import _progress
from gradmedic._rich import Console


def sigmoid_case():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 4))
    return model, torch.randn(32, 16), torch.arange(32) % 4


@pytest.fixture
def terminal(monkeypatch):
    """A console that says it is a terminal, writing to a buffer; no delay before a bar shows."""
    out = io.StringIO()
    monkeypatch.setattr(_progress, "_console", lambda: Console(file=out, force_terminal=True, width=100))
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)
    return out


def test_check_with_steps_shows_a_bar_on_a_terminal(terminal):
    model, x, y = sigmoid_case()
    gm.check(model, x, targets=y, loss_fn=nn.functional.cross_entropy, steps=3)
    assert "gm.check: training steps" in terminal.getvalue() and "4/4" in terminal.getvalue()


def test_treat_verification_shows_a_bar_per_run(terminal):
    model, x, y = sigmoid_case()
    report = gm.check(model, x, targets=y, loss_fn=nn.functional.cross_entropy)
    gm.treat(model, report, inputs=x, targets=y, loss_fn=nn.functional.cross_entropy, verify_steps=3)
    text = terminal.getvalue()
    assert "gm.treat: verifying untreated" in text and "3/3" in text


def test_nothing_is_drawn_off_a_terminal_nor_before_the_delay(capsys, monkeypatch):
    model, x, y = sigmoid_case()
    gm.check(model, x, targets=y, loss_fn=nn.functional.cross_entropy, steps=3)  # pytest's stdout: not a terminal
    assert capsys.readouterr().out == ""
    out = io.StringIO()
    monkeypatch.setattr(_progress, "_console", lambda: Console(file=out, force_terminal=True))
    with _progress.progress("quick", 3) as bar:  # DELAY_S (1 s) not reached
        bar.advance(3)
    assert out.getvalue() == ""


def test_one_bar_at_a_time_and_an_inner_call_adds_none(terminal):
    with _progress.progress("outer", 2) as outer:
        outer.advance()
        assert _progress._busy
        with _progress.progress("inner", 5) as inner:
            inner.advance()
            assert inner._bar is None
        outer.advance()
    assert not _progress._busy and "inner" not in terminal.getvalue()


def test_gradmedic_progress_0_turns_bars_off(terminal, monkeypatch):
    monkeypatch.setenv("GRADMEDIC_PROGRESS", "0")
    with _progress.progress("off", 2) as bar:
        bar.advance()
    assert terminal.getvalue() == ""


def test_end_of_a_run_prints_the_verdict_and_findings_first_and_the_table_to_a_file(tmp_path, capsys):
    from gradmedic.integrations._common import TABLE_NAME, TRACE_NAME, finish_run

    model, x, y = sigmoid_case()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, every=1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(loss)
        opt.step()
        opt.zero_grad()
    result = finish_run(mon, tmp_path, report=False, verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == f"gradmedic: not healthy ({result.worst()}): {len(result.findings)} finding(s)"
    assert lines[1].startswith(f"{result.findings[0].severity.upper()} {result.findings[0].kind}")
    assert not any("backward signal" in line for line in lines)  # no table on screen
    assert len(lines) < 25 and f"per-layer table in {tmp_path / TABLE_NAME}" in lines[-1]
    table = (tmp_path / TABLE_NAME).read_text()
    assert "backward signal" in table and "0" in table and (tmp_path / TRACE_NAME).is_file()
