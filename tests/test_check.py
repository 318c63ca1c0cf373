"""gm.check: the user's model, gradients and RNG are untouched; inputs in every form; one-line errors."""

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import gradmedic as gm
from tests.helpers import hook_state
from tests.zoo import mlp


@pytest.mark.parametrize("steps", [0, 2])  # 0: in place, no copy; 2: trains a deep copy
def test_model_grads_optimizer_and_rng_untouched(steps):
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
    gm.check(model, x, optimizer=opt, steps=steps)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert str(opt.state_dict()) == str(opt_state)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


class BNDropNet(nn.Module):
    """BatchNorm (running statistics, a step count), dropout (the RNG), a frozen part in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3))
        self.frozen_bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.frozen_bn(self.body(x)).flatten(1))


@pytest.mark.parametrize("steps", [0, 1])
def test_buffers_training_flags_grads_hooks_and_rng_put_back(steps):
    torch.manual_seed(0)
    model = BNDropNet().train()
    model.frozen_bn.eval()
    model(torch.randn(4, 3, 5, 5)).sum().backward()  # the user's own .grad, and moved running statistics
    calls = []
    model.body[0].register_forward_hook(lambda *a: calls.append("forward"))
    model.head.weight.register_hook(lambda g: calls.append("grad"))
    hooks = hook_state(model)
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: (b, b.clone()) for n, b in model.named_buffers()}
    flags = [m.training for m in model.modules()]
    x = torch.randn(8, 3, 5, 5)
    rng = torch.get_rng_state()
    report = gm.check(model, x, steps=steps)
    assert report.trace.last("grad_norm")  # it measured something
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert hook_state(model) == hooks
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]), n  # the same tensor, unwritten
    for n, b in model.named_buffers():
        assert b is buffers[n][0] and torch.equal(b, buffers[n][1]), n
    assert model.body[1].num_batches_tracked.item() == 1
    if not steps:
        assert calls == ["forward", "grad"]  # the user's hooks ran as in any forward/backward, and stay


class ClampsItsWeight(nn.Module):
    """A forward that writes into its own parameter (user code): check cannot undo it without a copy."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.1, 0.1)
        return self.lin(x)


def test_a_forward_that_writes_its_parameters():
    # nn.Embedding(max_norm) renormalises the rows it looks up, in place: check puts them back
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 6, max_norm=0.5), nn.Flatten(), nn.Linear(18, 2))
    before = emb[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm.check(emb, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert torch.equal(emb[0].weight, before)
    # anything else is named in a warning, not silently changed
    torch.manual_seed(0)
    model = ClampsItsWeight()
    nn.init.constant_(model.lin.weight, 1.0)
    with pytest.warns(gm.GradmedicWarning, match="lin.weight"):
        gm.check(model, torch.randn(3, 4))


def test_check_without_steps_makes_no_copy(monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("copy.deepcopy called by gm.check(steps=0)")

    model = BNDropNet()
    monkeypatch.setattr(copy, "deepcopy", no_copy)
    assert gm.check(model, torch.randn(8, 3, 5, 5)).trace.last("grad_norm")
    with pytest.raises(gm.GradmedicError, match="steps=0"):
        gm.check(model, torch.randn(8, 3, 5, 5), steps=1)  # a copy is needed to train; its failure says so


def test_check_gradients_match_autograd_on_the_model_itself():
    # float64: the per-layer gradient norms check reports equal torch.autograd.grad's, to 1e-12 relative
    model = mlp(3, 8, nn.Tanh, dtype=torch.float64)
    x, y = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    got = gm.check(model, x, y, loss_fn=nn.functional.mse_loss).trace.last("grad_norm")
    names = dict(model.named_modules())
    params = [p for p in model.parameters()]
    grads = dict(zip(params, torch.autograd.grad(nn.functional.mse_loss(model(x), y), params), strict=True))
    want = {n: float(torch.sqrt(sum(grads[p].square().sum() for p in m.parameters(recurse=False))))
            for n, m in names.items() if list(m.parameters(recurse=False))}
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-12), n
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_check_peak_memory_is_about_one_forward_backward():
    # each in a fresh process (benchmarks/check_memory.py); a 50 MB MLP. Measured 1.00-1.31x of a plain
    # forward+backward (peak RSS moves with the allocator from run to run); the deep copy it replaced: 1.92x.
    # 1.5x separates the two with room on both sides (the issue asks for "about 1.3x")
    from benchmarks.check_memory import run_all

    results = run_all(variants=("plain", "check"))
    assert results["check"]["extra_mb"] <= 1.5 * results["plain"]["extra_mb"], results


def test_the_users_gradients_do_not_leak_into_the_check():
    model = mlp(3, 8, nn.Tanh)
    x = torch.randn(4, 16)
    clean = gm.check(model, x).trace.last("grad_norm")
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e3)
    assert gm.check(model, x).trace.last("grad_norm") == clean


class _Reversible(torch.autograd.Function):
    """A block run without a graph and recomputed in the backward, whose own ``torch.autograd.backward`` writes the
    block's parameter gradients into ``.grad`` (as Reformer's reversible layers do): ``autograd.grad`` sees no edge
    to those parameters and returns None for them."""

    @staticmethod
    def forward(ctx, x, block):
        ctx.save_for_backward(x)
        ctx.block = block
        with torch.no_grad():
            return block(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(ctx.block(x), grad)
        return x.grad, None


class ReversibleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.block, self.last = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2)

    def forward(self, x):
        return self.last(_Reversible.apply(self.first(x), self.block))


def test_a_function_with_its_own_backward_neither_writes_the_users_grads_nor_hides_its_parameters():
    torch.manual_seed(0)
    model = ReversibleNet()
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    users = {p: torch.zeros_like(p) for p in model.parameters()}
    for p, g in users.items():
        p.grad = g
    report = gm.check(model, x, y, loss_fn=nn.functional.mse_loss)
    assert all(p.grad is g and not g.any() for p, g in users.items())  # the same tensors, still zero
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(x), y).backward()  # the independent path: a plain backward into .grad
    got = report.trace.last("grad_norm")
    for name in ("first", "block.0", "last"):
        module = dict(model.named_modules())[name]
        want = float(torch.sqrt(sum(p.grad.square().sum() for p in module.parameters(recurse=False))))
        assert got[name] == pytest.approx(want, rel=1e-5), name
    assert not report.of_kind("no_gradient")


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
