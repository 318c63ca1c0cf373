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
C1 = "issue 28 class 1: saturation read without the loss that follows (BCE's gradient at the logit is p - y)"
C2 = ("issue 28 class 2: layers that only score attention (Bahdanau W/U/v) or a parallel head (NeRF's density) "
      "are read as points on the gradient's path")
C3 = "issue 28 class 3: the encoder's last-output horizon is read though the loss reads every encoder state"
C4 = "issue 28 class 4: a small-by-design output head alone sets the depth reference / the absolute grad/weight"
C5 = "issue 28 class 5: layers no optimizer holds (the GAN's D) are read as stalled or set the depth reference"
C6 = "issue 28 class 6: the dead-unit margin widens as units die, so dead units are under-counted"
C7 = "issue 28 class 7: a gradient tiny everywhere (grad/weight ~1e-7) with a flat profile is read as a warning or not"
C8 = "issue 28 class 8: a head's own zero-init bias sets the reference median after a few steps"
C9 = "issue 28 class 9: check says 'No findings' where only training dynamics can tell (post-LN depth, no warmup)"
KNOWN_WRONG: dict[tuple[str, str], str] = {
    **{("GRU seq2seq + Bahdanau attention, T=12", w): C2 for w in ("init", "steps")},
    **{("LSTM seq2seq + Bahdanau attention, T=20", w): C2 + "; " + C3 for w in ("init", "steps")},
    **{("NeRF MLP (density head, volume rendering)", w): C2 for w in ("init", "steps")},
    **{("GRU seq2seq + attention trained 200 steps", w): C2 + " (its scoring tanh saturates as attention sharpens)"
       for w in ("init", "steps")},
    **{("SICK 2: additive attention over a 10-layer sigmoid encoder", w): C2 + " (the vanishing encoder reads "
       "'exploding')" for w in ("init", "steps")},
    **{("3-layer regression net, head gain 0.01", w): C4 for w in ("init", "steps")},
    **{("confident sigmoid head (x50) + BCE", w): C1 + "; " + C4 for w in ("init", "steps")},
    **{("RetinaNet head (prior bias -4.6, sigmoid + BCE)", w): C1 for w in ("init", "steps")},
    **{("VAE trained 400 steps", w): C1 for w in ("init", "steps")},
    ("GAN generator step (generator-only Adam)", "init"): C5,
    ("GAN generator step (generator-only Adam)", "steps"): C5,
    ("SICK 5: GAN generator step, generator lr 1e-9", "init"): C5,
    ("SICK 5: GAN generator step, generator lr 1e-9", "steps"): C5,
    **{("SICK 6: 60 of 64 ReLUs dead, 1-100 own stds below zero", w): C6 + " (94% measured, 48% read)"
       for w in ("init", "steps")},
    **{("SICK 7: 16-layer linear graph net, weights x0.5", w): C7 for w in ("init", "steps")},
    ("MLP + BERT-style head owning its zero bias", "steps"): C8,
    **{("SICK 9: 24-layer post-LN transformer, Adam 1e-3", w): C9 for w in ("init", "steps")},
}

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
