"""HTML reports: self-contained, escaped, written atomically, and rendered by a real browser."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.lab import run_experiment
from gradmedic.report import Page, report_page, suite_page, write_page

EVIL = "<script>alert(1)</script>"


def evil_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("inp", nn.Linear(8, 16))
    model.add_module(EVIL, nn.Sigmoid())
    for i in range(6):
        model.add_module(f"h{i}", nn.Linear(16, 16))
        model.add_module(f"s{i}", nn.Sigmoid())
    model.add_module("out", nn.Linear(16, 3))
    return model


def check_page(tmp_path):
    report = gm.check(evil_model(), torch.randn(32, 8), torch.randint(0, 3, (32,)), steps=3)
    return write_page(report_page(report, title=f"check of {EVIL}"), tmp_path / "check.html")


def test_check_report_is_self_contained_and_escaped(tmp_path):
    text = check_page(tmp_path).read_text()
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script" not in text  # no script of ours either
    assert not re.search(r'src="(?!data:image/png;base64,)', text)  # every image is inline
    assert text.count("<img ") == 3  # heatmap, per-layer bars, loss
    assert "vanishing_gradients" in text


def test_suite_page_has_claims_and_figures():
    rows = []
    for label, depth in (("shallow", 2), ("deep", 6)):
        config = {"experiment": "capacity", "label": label, "seed": 0}
        rows.append((config, run_experiment({"model": "mlp", "spec": {"depth": depth, "activation": "sigmoid"},
                                             "steps": 10})))
    rows[0][0]["label"] = "baseline"
    text = suite_page("mine", rows).html()
    assert "Dropout, wider or deeper nets help vanishing gradients" in text
    assert text.count("<img ") == 3  # loss curves, per-layer bars, heatmap


def test_write_page_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "r.html"
    path.write_text("old report")
    page = Page("x")

    class Boom:
        def savefig(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        page.figure(Boom(), "fails")
    write_page(page, path)
    assert path.read_text().startswith("<!DOCTYPE html>") and not list(tmp_path.glob(".*tmp*"))


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium here: .ci/run installs Debian's chromium with apt-get; where that cannot be done the "
                "browser rendering check is skipped")


def _screenshot(browser, page, png):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           "--hide-scrollbars", "--window-size=1000,2200", f"--screenshot={png}", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.exists(), "Chromium wrote no screenshot"
    import matplotlib.image

    return matplotlib.image.imread(png)[..., :3]


def _colour_bands(image, min_pixels=2, gap=12):
    """Vertical bands of rows holding saturated colour (figures), as (start, end) row pairs."""
    hi, lo = image.max(axis=2), image.min(axis=2)
    saturated = (hi - lo) > 0.3  # page chrome is white/grey and pastel; plots are saturated
    rows = np.flatnonzero(saturated.sum(axis=1) >= min_pixels)
    bands = []
    for r in rows:
        if bands and r - bands[-1][1] <= gap:
            bands[-1][1] = r
        else:
            bands.append([r, r])
    return [(a, b) for a, b in bands if b - a > 40], saturated.mean()


def test_chromium_renders_the_figures(tmp_path):
    browser = _browser()
    page = check_page(tmp_path)
    bands, fraction = _colour_bands(_screenshot(browser, page, tmp_path / "page.png"))
    # the control: the same page without its images renders no coloured regions
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    bare_bands, bare_fraction = _colour_bands(_screenshot(browser, bare, tmp_path / "bare.png"))
    assert bare_bands == [] and bare_fraction < 0.001
    assert len(bands) >= 3, bands  # heatmap, bars and loss curve each drew a coloured region
    assert fraction > 0.02


def test_a_finding_without_a_remedy_does_not_say_nothing_to_change():
    # no_gradient has no remedy: the page points at the finding, not at "nothing to change"
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.side = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            self.side(h.detach())
            return h

    torch.manual_seed(0)
    report = gm.check(Cut(), torch.randn(8, 4))
    assert [f.remedies for f in report.findings if f.kind == "no_gradient"] == [[]]
    text = report_page(report, "cut").html()
    assert "No remedy applies" in text and "Nothing to change" not in text


def test_an_exactly_zero_gradient_is_drawn_not_left_blank_like_an_unmeasured_step():
    from gradmedic.report import plots

    values = np.array([[0.0, 1e-3, np.nan], [0.0, 2e-3, 1.0]])  # (steps, layers): layer 'a' exactly 0 throughout
    fig = plots.gradient_heatmap([0, 1], ["a", "b", "c"], values)
    ax = fig.axes[0]
    assert len(ax.images) == 2 and "black: exactly 0" in ax.get_title()
    zero_layer = ax.images[1].get_array()
    assert not np.ma.getmaskarray(zero_layer)[0].any() and np.ma.getmaskarray(zero_layer)[1:].all()
    plain = plots.gradient_heatmap([0, 1], ["a", "b", "c"], np.where(values == 0, 1e-4, values))
    assert len(plain.axes[0].images) == 1 and "exactly 0" not in plain.axes[0].get_title()


def test_layer_bars_mark_an_exact_zero_gradient():
    """A zero has no bar on the log axis: it is marked on the floor (a black x), not left like a missing layer."""
    from gradmedic.report import plots

    fig = plots.layer_bars(["a", "b", "c"], {"init": [0.0, 1e-3, None], "later": [1e-2, 0.0, 1.0]})
    ax = fig.axes[0]
    assert "x: exactly 0" in ax.get_title()
    (marks,) = [line for line in ax.get_lines() if line.get_marker() == "x"]
    xs, ys = marks.get_data()
    assert sorted(np.round(xs, 3)) == [-0.2, 1.2] and np.all(np.asarray(ys) == ax.get_ylim()[0])
    only_zero = plots.layer_bars(["a"], {"init": [0.0]}).axes[0]
    assert only_zero.get_ylim()[0] > 0 and [ln for ln in only_zero.get_lines() if ln.get_marker() == "x"]
    plain = plots.layer_bars(["a", "b"], {"init": [1e-3, None]}).axes[0]
    assert "exactly 0" not in plain.get_title() and not plain.get_lines()


def test_short_layer_names_keep_what_tells_them_apart():
    from gradmedic.report import plots

    names = [f"feature_extractor.{i}.conv_with_a_rather_long_name" for i in range(12)]
    for width in (18, 28):
        short = [plots._short(n, width) for n in names]
        assert len(set(short)) == len(names) and all(len(s) <= width for s in short), short
    assert plots._short("model.layers.11.self_attn.q_proj") == "m.layers.11.self_attn.q_proj"
    assert plots._short("lm_head") == "lm_head"


def test_layer_bars_over_a_narrow_range_span_a_decade():
    """0.42 against 0.51 on a tight log axis drew the smaller bar as almost nothing."""
    from gradmedic.report import plots

    ax = plots.layer_bars(["rnn", "readout"], {"init": [0.51, 0.42]}).axes[0]
    low, high = ax.get_ylim()
    assert low <= 0.42 / 3 + 1e-9 and high >= 0.51


def test_printing_a_report_leaves_pythons_random_state_alone():
    """rich draws from ``random`` when first imported; gradmedic imports it with the state put back."""
    import subprocess
    import sys

    code = ("import random, torch, gradmedic as gm\n"
            "from torch import nn\n"
            "report = gm.check(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(8, 4))\n"
            "random.seed(5)\n"
            "state = random.getstate()\n"
            "text = str(report)\n"
            "assert text and random.getstate() == state, 'moved'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # a fresh process: rich not yet imported


def test_the_loss_curve_marks_its_first_nan_and_draws_the_learning_rate_beside_it():
    from gradmedic.report import plots

    steps = list(range(60))
    loss = list(np.linspace(2.3, 1.0, 60))
    loss[40:] = [float("nan")] * 20
    fig = plots.loss_curves({"loss": (steps, loss)})
    ax = fig.axes[0]
    assert "first non-finite loss (step 40)" in [line.get_label() for line in ax.get_lines()]
    assert ax.get_xlim() == (0, 59)  # the steps after the NaN ran too
    lr = (steps, [1e-3] * 30 + [3e-2] * 30)
    with_lr = plots.loss_curves({"loss": (steps, list(np.linspace(2.3, 1.0, 60)))}, lr=lr)
    assert len(with_lr.axes) == 2 and with_lr.axes[1].get_ylabel() == "learning rate"
    assert list(with_lr.axes[1].get_lines()[0].get_ydata()) == lr[1]
