"""A 48-block transformer's report: findings first, then the per-role depth profile (one line per role,
block index on the x axis) inside the first screen, the 340-row table folded in <details>; an action in
"what to do". Rendered by headless Chromium: the figure's box measured in the laid-out page, and the
screenshot's first screen shown to hold a multi-line plot."""

import re
import subprocess

import numpy as np
import pytest
import torch

import gradmedic as gm
from gradmedic.report import report_page, write_page
from gradmedic.report.pages import role_lines
from tests.test_report import _browser, _colour_bands, _screenshot

transformers = pytest.importorskip("transformers")

SCREEN = (1000, 1000)  # width, height of the first screen
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=48, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (2, 8))
    return gm.check(model, {"input_ids": ids, "labels": ids})


def test_role_lines_group_a_gpt2_by_block_and_role(report):
    lines = role_lines(report.trace, "grad_norm")
    assert list(lines) == ["ln_1 (norm)", "attn.c_attn (attn_qkv)", "attn.c_proj (attn_out)", "ln_2 (norm)",
                           "mlp.c_fc (mlp_in)", "mlp.c_proj (mlp_out)"]
    blocks, values = lines["mlp.c_fc (mlp_in)"]
    assert blocks == list(range(48))
    last = report.trace.last("grad_norm")
    assert values == [last[f"transformer.h.{i}.mlp.c_fc"] for i in range(48)]


def test_page_order_and_folded_table(report, tmp_path):
    text = write_page(report_page(report), tmp_path / "r.html").read_text()
    findings, figure = text.index("<h2>Findings</h2>"), text.index('alt="per-role depth profile"')
    details = text.index("<details><summary>")
    assert findings < figure < details
    rows = report.to_dict()["layers"]
    assert len(rows) >= 48 * 7  # every block's norms and projections, the blocks, the embeddings and the head
    assert text.count("<tr>", details) == len(rows) + 1  # every layer is still there, folded (+1: the header row)
    assert "per-layer gradient bars" not in text  # no 340-bar comb


def test_what_to_do_is_an_instruction(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(16, 16), nn.Sigmoid())])
    report = gm.check(model, torch.randn(32, 16), torch.randint(0, 16, (32,)))
    assert report.findings
    text = report_page(report).html()
    tried = gm.treat(model, report, inputs=torch.randn(32, 16), targets=torch.randint(0, 16, (32,)))
    from gradmedic.diagnosis import first_remedy

    first, why = first_remedy(report.findings[0], report)
    description = gm.REMEDIES[first].description
    # the description, as a sentence, of the one first remedy (what gm.treat tries first and applies when it clears
    # the finding: the least invasive model change, not necessarily the top-ranked: xavier_init before
    # add_normalization here), and why it is first
    assert first == "xavier_init" and report.findings[0].remedies[0] == "add_normalization"
    assert f"<td>{description[:1].upper()}{description[1:]} ({first}; first because {why})." in text
    assert tried.applied and tried.applied[0][0] == first


def _figure_box(browser, page, tmp_path):
    """Top and bottom (CSS px) of the per-role figure in the page as Chromium lays it out at SCREEN."""
    probe = tmp_path / "measure.html"
    script = ("<script>window.onload=function(){var r=document.querySelector('img[alt=\"per-role depth profile\"]')"
              ".getBoundingClientRect();document.title='box:'+r.top+':'+r.bottom;}</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", f"--window-size={SCREEN[0]},{SCREEN[1]}", "--dump-dom",
           probe.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    found = re.search(r"<title>box:([\d.]+):([\d.]+)</title>", out)
    assert found, "Chromium did not report the figure's box"
    return float(found.group(1)), float(found.group(2))


def test_chromium_shows_the_role_figure_in_the_first_screen(report, tmp_path):
    browser = _browser()
    page = write_page(report_page(report, title="48-block GPT-2"), tmp_path / "gpt2.html")
    top, bottom = _figure_box(browser, page, tmp_path)
    assert 0 < top < bottom <= SCREEN[1] and bottom - top > 200
    shot = tmp_path / "first-screen.png"
    image = _screenshot(browser, page, shot)[: SCREEN[1]]
    bands, _ = _colour_bands(image[int(top):int(bottom)], min_pixels=2, gap=60)
    assert bands and bands[-1][1] - bands[0][0] > 0.5 * (bottom - top), bands  # lines drawn down the plot's height
    pixels = (image[int(top):int(bottom)] * 255).round().astype(int).reshape(-1, 3)
    colours = sum(1 for c in TAB10 if (np.abs(pixels - c).max(axis=1) <= 8).sum() >= 50)
    assert colours >= 5, colours  # one colour per role line: the multi-line profile, not another figure


def test_a_plain_mlp_has_no_role_profile():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Sigmoid())])
    assert role_lines(gm.check(model, torch.randn(4, 8)).trace, "grad_norm") == {}
