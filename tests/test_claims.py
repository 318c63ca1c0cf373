"""Verdicts are computed from results: hand-made results give the verdicts the rules say they should."""

from gradmedic.lab.claims import fmt, group_results, judge

BASE = 2.3


def result(loss, ratio=1.0, **extra):
    return {"final_loss": loss, "baseline": BASE, "ratio_init": ratio, "steps_to_target": None, **extra}


def verdicts(experiment, by_label):
    rows = [({"experiment": experiment, "label": label, "seed": 0}, r) for label, r in by_label.items()]
    return {v.claim: v for v in judge(group_results(rows))}


def test_trains_versus_stalls():
    supported = verdicts("init_relu", {"he": result(0.5), "glorot": result(2.3)})
    (v,) = supported.values()
    assert v.verdict == "supported"
    assert "he: loss 0.5 (trains)" in v.evidence and "glorot: loss 2.3 (stalls)" in v.evidence
    (v,) = verdicts("init_relu", {"he": result(2.2), "glorot": result(2.3)}).values()
    assert v.verdict == "not supported"


def test_mixed_when_only_some_cases_agree():
    by_label = {"none": result(None, diverged_at=4), "norm": result(0.3), "value": result(2.0)}
    (v,) = verdicts("clipping", by_label).values()
    assert v.verdict == "mixed" and "diverged at step 4" in v.evidence


def test_accumulation_claim_is_not_supported_when_ratios_match():
    by_label = {"batch 16": result(2.3, 2.6e-9), "batch 64": result(2.3, 2.5e-9),
                "4 x 16 accumulated": result(2.3, 2.5e-9)}
    (v,) = verdicts("accumulation", by_label).values()
    assert v.verdict == "not supported" and "2.5e-09" in v.evidence


def test_medians_over_seeds_and_missing_experiments():
    rows = [({"experiment": "batchnorm", "label": label, "seed": s}, result(loss))
            for label, losses in (("batchnorm", (0.2, 0.3, 2.3)), ("plain", (2.3, 2.3, 0.1))) for s, loss in
            enumerate(losses)]
    (v,) = judge(group_results(rows))
    assert v.verdict == "supported" and "batchnorm: loss 0.3" in v.evidence  # the medians: 0.3 and 2.3
    assert judge({}) == []


def test_number_format():
    assert [fmt(v) for v in (0.0, 2.302, 1e-9, 1.5e5, float("inf"), None)] == ["0", "2.3", "1.0e-09", "1.5e+05",
                                                                              "diverged", "n/a"]
