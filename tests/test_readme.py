"""The README's first-screen example runs as written, and prints what the README says it prints."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- first-screen example: tests/test_readme.py runs this block -->"


def blocks():
    text = README.read_text(encoding="utf-8")
    code = re.search(re.escape(MARK) + r"\s*```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"## What the output means\s*```text\n(.*?)```", text, re.S).group(1)
    return text, code, shown


def test_the_first_screen_is_install_check_meaning_fix_then_integrations():
    text, code, _ = blocks()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:4] == ["Install", "Check your own model", "What the output means", "Apply the fix in your code"]
    assert headings.index("Integrations") > 3 and headings[-1] == "Development"
    assert text.index(MARK) < 1500  # the example is on the first screen


def test_the_first_screen_example_runs_and_prints_what_the_readme_shows(monkeypatch):
    import torch

    _, code, shown = blocks()
    monkeypatch.setenv("COLUMNS", "120")
    out = io.StringIO()
    state = torch.random.get_rng_state()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    finally:
        torch.random.set_rng_state(state)
    printed = " ".join(out.getvalue().split())
    # every sentence the README shows is printed; numbers to within 1% (kernels differ in the last bits)
    for line in ("ERROR vanishing_gradients: The gradient reaching '0' is", "Sigmoid's slope is at most 0.25",
                 "not healthy (error): 1 finding(s)", "weights treated as fresh",
                 "xavier_init: Xavier (uniform) draw at the critical scale for depth 11"):
        assert line in shown.replace("\n", " ") or line in " ".join(shown.split())
        assert line in printed, line
    want = re.search(r"untreated ([\d.]+), xavier_init ([\d.]+)", shown).groups()
    got = re.search(r"untreated ([\d.]+), xavier_init ([\d.]+)", printed).groups()
    assert [float(g) for g in got] == pytest.approx([float(w) for w in want], rel=0.01)


def test_the_fix_written_into_your_code_makes_the_example_healthy():
    """"Apply the fix in your code": the call the README gives for xavier_init, on the example's own model."""
    import torch

    _, code, _ = blocks()
    text = README.read_text(encoding="utf-8")
    fix = re.search(r"<!-- applying the fix.*?```python\n.*?\n(gm\.remedies\.[^\n]+)\n", text, re.S).group(1)
    setup = code.split("report = gm.check")[0]
    scope: dict = {"__name__": "readme"}
    state = torch.random.get_rng_state()
    try:
        exec(compile(setup, str(README), "exec"), scope)
        before = scope["gm"].check(scope["model"], scope["x"], targets=scope["y"])
        exec(fix, scope)
        after = scope["gm"].check(scope["model"], scope["x"], targets=scope["y"])
    finally:
        torch.random.set_rng_state(state)
    assert not before.healthy and after.healthy, after
