"""What a notebook shows: ``_repr_html_`` of Report, Finding, Trace and Treatment (escaped, figures inline, a
line instead of figures without matplotlib), plain reprs that fit a line, and examples/quickstart.ipynb run
headless by a real Jupyter kernel, its HTML rendered by Chromium."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gradmedic as gm
from tests.test_report import EVIL, _browser, _colour_bands, _screenshot, evil_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def held():
    """What a user holds after check, treat and a monitored run of a sigmoid net with a hostile layer name."""
    model = evil_model()
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    report = gm.check(model, x, targets=y, loss_fn=nn.functional.cross_entropy)
    treatment = gm.treat(model, report, inputs=x, targets=y, loss_fn=nn.functional.cross_entropy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gm.Monitor(model, opt, every=1) as mon:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()
    return {"report": report, "finding": report.findings[0], "treatment": treatment, "trace": mon.trace}


@pytest.mark.parametrize("name", ["report", "finding", "treatment", "trace"])
def test_plain_repr_fits_a_line_and_html_is_an_escaped_fragment(held, name):
    obj = held[name]
    text = repr(obj)
    assert "\n" not in text and len(text) < 320, text
    assert "Sequential(" not in text  # a Treatment's repr used to print the whole model
    page = obj._repr_html_()
    assert page.startswith('<div class="gradmedic">') and page.endswith("</div>")
    assert "<html" not in page and "<body" not in page  # inline in a cell, not a document
    assert EVIL not in page  # a layer called <script> shows as text
    if name in ("report", "trace"):  # they list every layer
        assert "&lt;script&gt;" in page


def test_report_html_holds_the_verdict_findings_and_figures(held):
    page = held["report"]._repr_html_()
    assert re.search(r"Not healthy \(error\): \d+ finding", page)
    assert "vanishing_gradients" in page and "what to do" in page
    assert page.count("<img ") >= 1


def test_treatment_html_calls_the_untreated_run_a_baseline_not_kept():
    from gradmedic.remedies.treat import Treatment
    from gradmedic.remedies.verify import Evidence

    treatment = Treatment(model=nn.Linear(2, 2), applied=[("xavier_init", "re-drew", "why")],
                          evidence=[Evidence("untreated", [1.0], kept=True), Evidence("xavier_init", [0.5], kept=True),
                                    Evidence("add_residual", [0.7], kept=False)])
    page = treatment._repr_html_()
    outcomes = re.findall(r"<td>(baseline|kept|not kept)</td>", page)
    assert outcomes == ["baseline", "kept", "not kept"]
    assert repr(treatment) == ("Treatment(applied=['xavier_init'], recipe=[], skipped=[], trained=True, "
                               "verified_kept=['xavier_init'])")


def test_without_matplotlib_the_report_still_shows_with_one_line_saying_how(held, monkeypatch):
    from gradmedic._errors import GradmedicError
    from gradmedic.report import plots

    def missing():
        raise GradmedicError("Reports need matplotlib: pip install 'gradmedic[report]'")

    monkeypatch.setattr(plots, "_pyplot", missing)
    for obj in (held["report"], held["trace"]):
        page = obj._repr_html_()
        assert "No figures: Reports need matplotlib: pip install &#x27;gradmedic[report]&#x27;" in page
        assert "<img " not in page
    assert "vanishing_gradients" in held["report"]._repr_html_()


def run_quickstart(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's gradmedic
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    return nb


def test_quickstart_notebook_runs_headless_and_shows_the_report_inline(tmp_path, monkeypatch):
    nb = run_quickstart(tmp_path, monkeypatch)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    html = [o["data"]["text/html"] for c in code for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(html) == 4  # report, finding, treatment, the treated model's report
    report, finding, treatment, after = html
    assert "Not healthy (error)" in report and "vanishing_gradients" in report and "<img " in report
    assert "error: vanishing_gradients" in finding and "xavier_init" in treatment
    assert "Healthy" in after or "Not healthy" in after
    plain = [o["data"]["text/plain"] for c in code for o in c.outputs if "text/plain" in o.get("data", {})]
    assert all(len(p) < 320 for p in plain)
    # what the notebook showed, in a browser: the findings and the figures render
    page = tmp_path / "cells.html"
    page.write_text("<!DOCTYPE html><html><body>" + "".join(html) + "</body></html>")
    browser = _browser()
    shot = tmp_path / "notebook.png"
    bands, fraction = _colour_bands(_screenshot(browser, page, shot))
    assert len(bands) >= 2 and fraction > 0.01, bands  # the report's figures and the treated model's
    if (target := ROOT / ".screenshots").is_dir():  # keep one to look at
        (target / "notebook.png").write_bytes(shot.read_bytes())
