"""Lab rows from elsewhere (a database edited by hand or made by another program): a row without its seed or
label, a label the claims cannot parse, JSON nested too deeply, a result without a field the claims or the
report read. Each is one line naming the row, the field and the fix, from ``report`` and ``lab publish``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_store_hostile import ROW, _lab_db, _raw, _result, cli, one_line


def _bad_rows(tmp_path: Path, config: dict, result: str | None = None) -> Path:
    db = _lab_db(tmp_path / "lab.db", [(config, None)])
    if result is not None:
        _raw(db, "UPDATE runs SET result = ?", args=(result,))
    return db


@pytest.mark.parametrize("command", ["report", "publish"])
@pytest.mark.parametrize("config,result,match", [
    ({"experiment": "capacity", "label": "baseline"}, None, "has no 'seed' in its configuration"),
    ({"experiment": "capacity", "seed": 0}, None, "has no 'label' in its configuration"),
    ({**ROW, "seed": "zero"}, None, "has 'seed' = 'zero' (str), where an integer belongs"),
    (ROW, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (ROW, json.dumps(_result(deep=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]])),
     "nested over 32 deep"),
    ({"experiment": "depth", "label": "residual d=10x", "seed": 0}, None,
     "label 'residual d=10x' should end in a whole number after 'd='"),
    ({"experiment": "rnn_adding", "label": "irnn T=", "seed": 0}, None,
     "label 'irnn T=' should end in a whole number after 'T='"),
])
def test_a_lab_row_from_elsewhere_is_one_line_naming_it(capfd, tmp_path, command, config, result, match):
    db = _bad_rows(tmp_path, config, result)
    if command == "report":
        args = ["report", str(db), "-o", str(tmp_path / "r.html")]
    else:
        page = tmp_path / "README.md"
        page.write_text("<!-- gradmedic-lab:claims:begin -->\n<!-- gradmedic-lab:claims:end -->\n")
        args = ["lab", "publish", str(db), str(page), "--suite", "smoke"]
    code, out, err = cli(capfd, *args)
    assert code == 2 and one_line(err) and match in err, err


def test_a_result_without_a_field_a_claim_reads_is_one_line(capfd, tmp_path):
    result = _result()
    del result["baseline"]
    db = _lab_db(tmp_path / "lab.db", [({"experiment": "init_relu", "label": "he", "seed": 0}, result),
                                       ({"experiment": "init_relu", "label": "glorot", "seed": 0}, result)])
    page = tmp_path / "README.md"
    page.write_text("<!-- gradmedic-lab:claims:begin -->\n<!-- gradmedic-lab:claims:end -->\n")
    code, out, err = cli(capfd, "lab", "publish", str(db), str(page), "--suite", "smoke")
    assert code == 2 and one_line(err) and "experiment 'init_relu', seed 0) has no field 'baseline'" in err, err


def test_a_report_of_a_row_whose_curve_is_not_a_curve_is_one_line(capfd, tmp_path):
    db = _lab_db(tmp_path / "lab.db", [(ROW, _result(curve="down"))])
    code, out, err = cli(capfd, "report", str(db), "-o", str(tmp_path / "r.html"))
    assert code == 2 and one_line(err) and "result whose 'curve' should be" in err, err


