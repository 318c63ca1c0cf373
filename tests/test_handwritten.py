"""Diagnosis on hand-written torch.nn models (issue 28): the corpus of tests/handwritten.py as tests.

Every healthy entry (at its usual init, or trained to a good result) checks with no warning or error at init and
after ``STEPS`` Adam steps; every sick twin gets the right kind, severity and layers; the post-LN case says that
init cannot tell. The verdicts gradmedic gets wrong today are marked ``xfail(strict=True)`` with the issue-28 class
that explains them (KNOWN_WRONG), so the suite stays green and each one flips to XPASS, failing the run, when its
rule is fixed: then take it out of KNOWN_WRONG. The ground truth of each entry is in its ``truth`` (measured by
tests/handwritten_truth.py); the check times are in benchmarks/handwritten_corpus.py's table.
"""

from __future__ import annotations

import re
import warnings

import pytest

import gradmedic as gm
from tests.handwritten import ENTRIES, STEPS, Entry, judge

# (entry name, "init" or "steps") -> why gradmedic's verdict is wrong today (benchmarks/handwritten_corpus.md)
# classes 1-9 are fixed (CHANGELOG.md, issue 28); their entries pass unmarked
KNOWN_WRONG: dict[tuple[str, str], str] = {}

_BUILT: dict[str, tuple] = {}


def _built(entry: Entry) -> tuple:
    """One build per entry for both checks: check at init leaves the model as it was, and steps > 0 trains a copy
    with a fresh copy of the optimizer, so the two checks can share it (a trained entry trains once)."""
    if entry.name not in _BUILT:
        _BUILT[entry.name] = entry.build()
    return _BUILT[entry.name]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cases():
    for entry in ENTRIES:
        for when in ("init", "steps"):
            marks = []
            reason = KNOWN_WRONG.get((entry.name, when))
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            yield pytest.param(entry, when, marks=marks, id=f"{_slug(entry.name)}-{when}")


@pytest.mark.parametrize("entry,when", list(_cases()))
def test_handwritten_verdict(entry: Entry, when: str):
    model, inputs, kwargs = _built(entry)
    expect = entry.at_init if when == "init" else entry.after_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gm.check(model, inputs, steps=0 if when == "init" else STEPS, **kwargs)
    ok, why = judge(report, expect)
    assert ok, f"{entry.name} ({when}): expected {expect}, {why}\n{report!r}\n{entry.truth}"


def test_corpus_shape():
    """>= 20 hand-written healthy architectures, >= 5 trained ones, a sick twin for each of classes 1-9."""
    healthy = [e for e in ENTRIES if e.at_init.kind is None and not e.at_init.undetermined and not e.trained]
    trained = [e for e in ENTRIES if e.trained and e.at_init.kind is None]
    sick = {e.issue_class for e in ENTRIES if e.name.startswith("SICK")}
    assert len(healthy) >= 20 and len(trained) >= 5
    assert sick >= set(range(1, 10))
    assert all(e.truth for e in ENTRIES)
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)
    assert set(KNOWN_WRONG) <= {(e.name, w) for e in ENTRIES for w in ("init", "steps")}
