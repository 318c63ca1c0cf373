"""`gradmedic lab publish`: the claims table goes between the markers, with its provenance, and nowhere else."""

import pytest

from gradmedic import GradmedicError
from gradmedic.lab.publish import BEGIN, END, publish
from gradmedic.lab.store import Store

MACHINE = {"platform": "Linux x86_64", "cpu_capability": "AVX2", "torch": "2.13.0"}


def _db(tmp_path):
    store = Store(tmp_path / "lab.db")
    for seed, (he, glorot) in enumerate(((0.1, 2.3), (0.2, 2.3), (0.15, 2.29))):
        for label, loss in (("he", he), ("glorot", glorot)):
            result = {"final_loss": loss, "baseline": 2.3, "ratio_init": 1.0, "machine": MACHINE}
            store.put("quick", {"experiment": "init_relu", "label": label, "seed": seed}, result, 1.0)
    return tmp_path / "lab.db"


def test_publish_rewrites_only_the_marked_section(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(f"# Title\n\nkeep me\n{BEGIN}\nstale table\n{END}\nand me\n")
    table = publish(_db(tmp_path), "quick", [page])
    text = page.read_text()
    assert text.startswith("# Title\n\nkeep me\n" + BEGIN) and text.endswith(END + "\nand me\n")
    assert "stale" not in text and table in text
    assert "6 runs, seeds [0, 1, 2]" in table and "Linux x86_64, CPU capability AVX2, torch 2.13.0" in table
    assert "**supported, 3/3 seeds**" in table and "he loss 0.15 [0.1, 0.2] (< 1.15)" in table
    publish(_db(tmp_path), "quick", [page])  # again: the same single section, not a second one
    assert page.read_text().count(BEGIN) == 1


def test_publish_errors_name_the_fix(tmp_path):
    db = _db(tmp_path)
    page = tmp_path / "NOTES.md"
    page.write_text("no markers here\n")
    with pytest.raises(GradmedicError, match="has no claims section; add the two lines"):
        publish(db, "quick", [page])
    with pytest.raises(GradmedicError, match="no results of suite 'full'; it holds: quick"):
        publish(db, "full", [page])
    with pytest.raises(GradmedicError, match="no such lab database"):
        publish(tmp_path / "nope.db", "quick", [page])
