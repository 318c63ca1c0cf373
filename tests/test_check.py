"""gm.check: the user's model, gradients and RNG are untouched; inputs in every form; one-line errors."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import gradmedic as gm
from tests.zoo import mlp


def test_model_grads_optimizer_and_rng_untouched():
    model = mlp(4, 16, nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 16)).sum().backward()
    opt.step()  # momentum state exists now
    model(torch.randn(3, 16)).sum().backward()  # grads present
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    x = torch.randn(8, 16)
    rng = torch.get_rng_state()
    gm.check(model, x, optimizer=opt, steps=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert str(opt.state_dict()) == str(opt_state)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_the_users_gradients_do_not_leak_into_the_check():
    model = mlp(3, 8, nn.Tanh)
    x = torch.randn(4, 16)
    clean = gm.check(model, x).trace.last("grad_norm")
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e3)
    assert gm.check(model, x).trace.last("grad_norm") == clean


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)

    def forward(self, x, y=None):
        return self.a(x) + (self.b(y) if y is not None else 0)


@dataclass
class Out:
    logits: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return Out(logits=self.lin(x))


@pytest.mark.parametrize("inputs", [
    (torch.randn(5, 3), torch.randn(5, 2)),
    {"x": torch.randn(5, 3), "y": torch.randn(5, 2)},
])
def test_tuple_and_dict_inputs(inputs):
    report = gm.check(TwoInputs(), inputs)
    assert set(report.trace.last("grad_norm")) == {"a", "b"}


def test_default_losses():
    x = torch.randn(6, 3)
    assert gm.check(DataclassOut(), x).trace.last("grad_norm")  # random projection of the logits
    assert gm.check(DataclassOut(), x, targets=torch.tensor([0, 1, 0, 1, 1, 0])).trace.last("grad_norm")  # CE
    assert gm.check(DataclassOut(), x, targets=torch.randn(6, 2)).trace.last("grad_norm")  # MSE
    report = gm.check(DataclassOut(), x, targets=torch.randn(6, 2), loss_fn=lambda o, t: (o.logits - t).abs().mean())
    assert report.trace.meta["check"]["loss"] == "given"


@pytest.mark.parametrize("call,match", [
    (lambda: gm.check(mlp(2, 4, nn.ReLU), torch.randn(3, 5)), "forward failed on these inputs"),
    (lambda: gm.check(mlp(2, 4, nn.ReLU), "x"), "Argument inputs should be"),
    (lambda: gm.check(mlp(2, 4, nn.ReLU), torch.randn(3, 16), steps=-1), "Argument steps should be"),
    (lambda: gm.check("model", torch.randn(3, 16)), "Argument model should be"),
    (lambda: gm.check(mlp(2, 4, nn.ReLU), torch.randn(3, 16), targets=torch.randn(7)), "No default loss"),
    (lambda: gm.check(mlp(2, 4, nn.ReLU), torch.randn(3, 16), loss_fn=lambda o, t: o), "floating-point scalar"),
    (lambda: gm.check(mlp(2, 4, nn.ReLU).requires_grad_(False), torch.randn(3, 16)), "trainable parameters"),
])
def test_errors_are_one_clear_line(call, match):
    with pytest.raises(gm.GradmedicError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_diagnose_a_training_run_sees_units_die():
    # a ReLU net driven by a far too large learning rate: units die during training, not at init
    torch.manual_seed(0)
    model = mlp(3, 64, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    with gm.Monitor(model, opt, preset="full") as monitor:
        for _ in range(15):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(loss)
            opt.step()
            opt.zero_grad()
    report = monitor.diagnose()
    dead = report.of_kind("dead_units")
    assert dead and dead[0].severity in ("warning", "error")
    layer = dead[0].layers[0]
    assert dead[0].evidence["at_first_step"][layer] < dead[0].evidence[f"dead_frac[{layer}]"]
    assert gm.diagnose(monitor.trace).to_json() == report.to_json()


def test_diagnose_a_training_run_sees_gradients_grow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 1))  # linear: nothing saturates
    opt = torch.optim.SGD(model.parameters(), lr=1.5)  # past the stability edge: each step overshoots more
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    with gm.Monitor(model, opt, preset="full") as monitor:
        for _ in range(12):
            loss = nn.functional.mse_loss(model(x), y)
            if not torch.isfinite(loss):
                break
            loss.backward()
            monitor.step(loss)
            opt.step()
            opt.zero_grad()
    growth = [f for f in monitor.diagnose().of_kind("exploding_gradients") if "grew" in f.message]
    assert growth and growth[0].evidence["growth"] > 1e3
