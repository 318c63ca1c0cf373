"""treat never harms: trained weights are kept, healthy models are left alone, the caller's RNG is as it was,
and what ``applied`` says is what was done (counted independently from the state dicts)."""

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.remedies.freshness import freshness
from tests import treat_zoo, zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def same_tensors(before: dict, model: nn.Module) -> list[str]:
    """Names of the tensors of ``before`` (a state dict) that ``model`` no longer holds bit for bit."""
    after = model.state_dict()
    return [k for k, v in before.items() if k not in after or not torch.equal(after[k], v)]


def case_report(case):
    return gm.check(case["model"], case["inputs"], targets=case["targets"], loss_fn=case["loss_fn"])


@pytest.mark.parametrize("name", ["tanh_mlp_40_chaotic", "sigmoid_mlp_10", "relu_mlp_10_exploding", "tanh_rnn_60",
                                  "lstm_60", "sigmoid_cnn_8"])
def test_trained_model_no_weight_redrawn_and_advice_lists_what_was_not_done(name):
    case = treat_zoo.build(name)
    before = copy.deepcopy(case["model"].state_dict())
    report = case_report(case)
    treatment = gm.treat(case["model"], report, inputs=case["inputs"], targets=case["targets"],
                         loss_fn=case["loss_fn"], trained=True)
    assert treatment.trained
    assert same_tensors(before, treatment.model) == []
    assert all(n == 0 for n in treatment.redrawn.values())
    assert treatment.advice, str(treatment)
    advised = {rid for rid, _ in treatment.advice}
    worst = report.findings[0]
    first_model_remedy = next(r for r in worst.remedies if gm.REMEDIES[r].acts_on == "model"
                              and r not in ("recycle_dormant", "layerscale", "numerical_guard", "gradcheck"))
    assert first_model_remedy in advised
    assert all("trained weights" in why for _, why in treatment.advice)
    assert "not done" in str(treatment)


def test_trained_post_ln_transformer_keeps_its_weights_and_gets_warmup_in_the_recipe():
    """Trained at lr 1e-2 without warmup, a post-LN stack breaks; on its trained weights treat may only insert
    LayerScale at 1 (tried: no better on the re-check, so not kept); pre-LN and DeepNorm become advice and the
    warmup goes into the recipe."""
    case = treat_zoo.build("post_ln_transformer_24")
    before = copy.deepcopy(case["model"].state_dict())
    opt = torch.optim.Adam(case["model"].parameters(), lr=case["lr"])
    report = gm.check(case["model"], case["inputs"], targets=case["targets"], steps=case["check_steps"], optimizer=opt)
    assert not report.healthy
    treatment = gm.treat(case["model"], report, inputs=case["inputs"], targets=case["targets"], optimizer=opt,
                         trained=True)
    assert same_tensors(before, treatment.model) == []
    assert str(treatment.model) == str(case["model"])
    assert {"pre_ln", "deepnorm"} <= {rid for rid, _ in treatment.advice}
    assert "lr_warmup" in treatment.recipe and treatment.schedule is not None
    scheduler = treatment.schedule(treatment.optimizer())
    assert scheduler.get_last_lr()[0] < treatment.lr  # the first step is warmed up
    assert any(rid == "layerscale" for rid, _ in treatment.skipped)


def test_trained_dead_units_are_revived_without_redrawing():
    """Most (not all) units of one layer dead: reviving them keeps every weight and the function on the batch.
    (A layer dead to the last unit makes the output constant: no function is left to preserve.)"""
    case = treat_zoo.build("relu_mlp_6_dead")
    model = case["model"]
    with torch.no_grad():
        model[2].bias[40:] = 0.0  # 40 of 64 units dead
    assert freshness(model)[0] is False  # biases out of their default range: read as trained
    before = copy.deepcopy(model.state_dict())
    report = case_report(case)
    treatment = gm.treat(model, report, inputs=case["inputs"], targets=case["targets"], loss_fn=case["loss_fn"])
    assert treatment.trained and [a[0] for a in treatment.applied] == ["recycle_dormant"], str(treatment)
    assert "without re-drawing" in treatment.applied[0][1]
    after = treatment.model.state_dict()
    linears = [k for k in before if k.endswith("weight")]
    for k in linears:  # incoming rows are never re-drawn: an entry either kept its value or was zeroed (outgoing)
        changed = after[k] != before[k]
        assert bool((after[k][changed] == 0).all()), k
    with torch.no_grad():  # the function on the batch is unchanged (the revived units' outputs go nowhere yet)
        torch.testing.assert_close(treatment.model(case["inputs"]), model(case["inputs"]), rtol=1e-5, atol=1e-5)
    assert not [f for f in treatment.report.of_kind("dead_units") if f.severity != "info"], repr(treatment.report)


def test_inferred_trained_weights_are_kept():
    """A model trained for 300 Adam steps is recognised as trained; treat then re-draws nothing."""
    case = treat_zoo.build("sigmoid_mlp_10")
    model = case["model"]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        case["loss_fn"](model(case["inputs"]), case["targets"]).backward()
        opt.step()
        opt.zero_grad()
    fresh, why = freshness(model)
    assert fresh is False, why
    before = copy.deepcopy(model.state_dict())
    report = case_report(case)
    treatment = gm.treat(model, report, inputs=case["inputs"], targets=case["targets"], loss_fn=case["loss_fn"])
    assert treatment.trained and "inferred" in treatment.trained_reason
    assert same_tensors(before, treatment.model) == []


def test_freshness_of_fresh_and_trained_modules():
    for seed in range(10):
        torch.manual_seed(seed)
        for module in (nn.Linear(16, 16), nn.Linear(8, 64), nn.Conv2d(3, 8, 3), nn.LSTM(4, 16),
                       nn.TransformerEncoderLayer(32, 4, 64), nn.Embedding(100, 16), treat_zoo.mlp(5, nn.Tanh, 3.0)):
            assert freshness(module)[0] is True, (seed, module)
    assert freshness(nn.Linear(2, 2))[0] is None  # 4 entries: too few to tell
    norm = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    with torch.no_grad():
        norm[1].weight.mul_(1.01)
    assert freshness(norm)[0] is False
    spiked = nn.Linear(64, 64)
    with torch.no_grad():
        spiked.weight.add_(0.2 * torch.outer(torch.randn(64), torch.randn(64)) / 8)  # a rank-one update
    assert freshness(spiked)[0] is False


def _own_healthy():
    torch.manual_seed(0)
    yield "resnet", lambda: (zoo.resnet(), torch.randn(8, 1, 8, 8), {})
    yield "lstm_short", lambda: (treat_zoo.LastStep("lstm"), torch.rand(16, 5, 2), {})
    yield "he_relu_mlp", lambda: (zoo.mlp(6, 32, nn.ReLU, init="he"), torch.randn(64, 16), {})


def healthy_families():
    """The real-architecture corpus of the diagnosis tests (healthy at init), and a few of our own."""
    from tests.corpus import HF_NAMES, SICK_AT_INIT, hf_families, torch_families

    families = list(_own_healthy()) + list(torch_families())
    try:
        import transformers  # noqa: F401
    except ImportError:
        return families
    return families + [(n, b) for n, b in hf_families() if n in HF_NAMES and n not in SICK_AT_INIT]


@pytest.mark.parametrize("name,build", healthy_families(), ids=lambda v: v if isinstance(v, str) else "")
def test_healthy_models_are_left_alone(name, build):
    import warnings

    model, inputs, kwargs = build()
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gm.check(model, inputs, **kwargs)
        assert report.healthy, repr(report)
        treatment = gm.treat(model, report, inputs=inputs, trained=False, **kwargs)
    assert treatment.applied == [] and treatment.recipe == []
    assert same_tensors(before, treatment.model) == []
    assert str(treatment.model) == str(model)  # the same architecture


def test_callers_rng_states_are_unchanged():
    case = treat_zoo.build("tanh_mlp_40_chaotic")
    report = case_report(case)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    treatment = gm.treat(case["model"], report, inputs=case["inputs"], targets=case["targets"],
                         loss_fn=case["loss_fn"], verify_steps=5)
    assert treatment.applied
    assert torch.equal(torch.get_rng_state(), states[0])
    np_after = np.random.get_state()
    assert np_after[0] == states[1][0] and np.array_equal(np_after[1], states[1][1]) and np_after[2:] == states[1][2:]
    assert random.getstate() == states[2]
    # and the treatment itself is reproducible: the same seed gives the same weights whatever the caller's RNG
    torch.manual_seed(999)
    again = gm.treat(case["model"], report, inputs=case["inputs"], targets=case["targets"], loss_fn=case["loss_fn"])
    assert same_tensors(treatment.model.state_dict(), again.model) == []


@pytest.mark.parametrize("rid,words", [("he_init", "He (normal)"), ("xavier_init", "Xavier (uniform)"),
                                       ("orthogonal_init", "orthogonal draw")])
def test_init_descriptions_say_what_was_drawn_and_count_the_tensors(rid, words):
    case = treat_zoo.build("tanh_mlp_40_default")
    model = case["model"]
    finding = gm.Finding("vanishing_gradients", "error", ["0"], "for the test", {}, [rid])
    treatment = gm.treat(model, gm.Report([finding]), trained=False)  # no inputs: applied unchecked
    (applied_rid, what, why), = treatment.applied
    assert applied_rid == rid and words in what and "he_init" not in what.lower().replace(" ", "_") or rid == "he_init"
    differing = same_tensors(model.state_dict(), treatment.model)  # the independent count
    assert f"re-drew or rescaled {len(differing)} existing parameter tensor(s)" in what
    assert treatment.redrawn[rid] == len(differing)
    assert why == "error vanishing_gradients at 0"
    if rid == "orthogonal_init":  # hidden layers are square: orthogonal up to the scale
        w = treatment.model[2].weight.detach().double()
        gram = w @ w.T
        # float32 weights: each Gram entry sums 64 products of entries rounded to 6e-8 relative, ~1e-6 at most
        torch.testing.assert_close(gram, gram[0, 0] * torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)


def test_the_recipes_optimizer_is_the_one_the_proof_trained_with():
    """Given the caller's optimizer, the verification runs train with its class and hyperparameters, and
    ``Treatment.optimizer()`` hands back the same (it gave Adam at 1e-3 after a proof at the caller's 1e-2)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 3))
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    report = gm.check(model, x, y)
    treated = gm.treat(model, report, inputs=x, targets=y, optimizer=opt, verify_steps=10)
    made = treated.optimizer()
    assert type(made) is torch.optim.SGD and treated.lr == 0.05
    assert made.defaults["momentum"] == 0.9 and made.defaults["nesterov"] and made.defaults["lr"] == 0.05
    assert opt.param_groups[0]["params"][0] is next(model.parameters())  # the caller's optimizer is untouched


def test_an_optimizer_without_a_learning_rate_argument_is_rebuilt_as_it_is():
    """A custom optimizer whose constructor takes no ``lr`` (it keeps a fixed one) is rebuilt with its own arguments
    only; and one with a tensor learning rate keeps it."""

    class FixedSGD(torch.optim.SGD):
        def __init__(self, params, momentum=0.0):
            super().__init__(params, lr=0.05, momentum=momentum)

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 3))
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    report = gm.check(model, x, y)
    tensor_lr = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    for opt in (FixedSGD(model.parameters(), momentum=0.5), tensor_lr):
        treated = gm.treat(model, report, inputs=x, targets=y, optimizer=opt, verify_steps=5)
        made = treated.optimizer()
        assert type(made) is type(opt) and made.defaults["lr"] == opt.defaults["lr"]
