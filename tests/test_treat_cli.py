"""`gradmedic check --treat`: the treatment and its training evidence after the report."""

import json

import torch

from gradmedic.cli import main


def test_check_treat_prints_the_treatment_and_its_evidence(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["check", "examples/sigmoid_mlp.py:build", "--treat", "20"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert "Treatment (gm.treat on a copy)" in out
    assert "xavier_init: Xavier (uniform) draw at the critical scale" in out
    assert "verified by training" in out and "untreated" in out


def test_check_treat_with_json_keeps_stdout_the_report(capsys):
    code = main(["check", "examples/exploding_mlp.py:build", "--json", "--treat", "0"])
    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out)["healthy"] is False  # stdout is exactly Report.to_json()
    assert "he_init" in captured.err
