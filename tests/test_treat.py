"""gm.treat on the sick examples: the treated copy checks healthy and trains to a clearly lower loss."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import gradmedic as gm

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


def example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def train(model, case, clip=None, steps=STEPS) -> float:
    """Seeded Adam (1e-3) on the example's batch; returns the mean loss of the last 10 steps."""
    torch.manual_seed(0)
    loss_fn = case.get("loss_fn") or nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(case["inputs"]), case["targets"])
        loss.backward()
        if clip is not None:
            clip([p for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return sum(losses[-10:]) / 10


@pytest.mark.parametrize("name,expected", [("sigmoid_mlp", "add_normalization"), ("dead_relu", "recycle_dormant"),
                                           ("exploding_mlp", "he_init")])
def test_treated_model_is_healthy_and_trains_better(name, expected):
    case = example(name)
    model = case["model"]
    original = copy.deepcopy(model.state_dict())
    kwargs = {"targets": case["targets"], "loss_fn": case.get("loss_fn")}
    before = gm.check(model, case["inputs"], **kwargs)
    assert not before.healthy
    treatment = gm.treat(model, before, inputs=case["inputs"], **kwargs)
    assert treatment.applied[0][0] == expected
    after = gm.check(treatment.model, case["inputs"], **kwargs)
    assert after.healthy, repr(after)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, original[k])
    untreated = train(copy.deepcopy(model), case)
    treated = train(treatment.model, case, clip=treatment.clip)
    print(f"{name}: loss after {STEPS} Adam steps: untreated {untreated:.4f}, treated {treated:.4f}")
    assert treated < 0.8 * untreated


def test_recipe_objects_are_usable():
    case = example("exploding_mlp")
    report = gm.check(case["model"], case["inputs"], targets=case["targets"])
    treatment = gm.treat(case["model"], report)  # no inputs: one round, batch-needing remedies skipped
    assert "clip_grad_norm" in treatment.recipe and treatment.clip is not None
    opt = treatment.optimizer()
    assert isinstance(opt, torch.optim.Adam)
    loss = nn.functional.cross_entropy(treatment.model(case["inputs"]), case["targets"])
    loss.backward()
    treatment.clip(list(treatment.model.parameters()))
    opt.step()
    assert "he_init" in str(treatment)


def test_bad_input():
    report = gm.check(nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(gm.GradmedicError, match="Argument report"):
        gm.treat(nn.Linear(2, 2), "report")
    with pytest.raises(gm.GradmedicError, match="Argument model"):
        gm.treat("model", report)
    with pytest.raises(gm.GradmedicError, match="Argument max_rounds"):
        gm.treat(nn.Linear(2, 2), report, max_rounds=0)
    quantised = nn.Linear(2, 2)
    quantised.register_parameter("codes", nn.Parameter(torch.zeros(2, dtype=torch.int8), requires_grad=False))
    with pytest.raises(gm.GradmedicError, match="floating point"):
        gm.treat(quantised, report)
