"""torch.compile: a monitored compiled model compiles exactly as often as an unmonitored one, keeps the
user's layer names, and is diagnosed as the eager model is.

Backend "aot_eager" (dynamo + AOT autograd, no code generation): inductor's first compile of even this
small model takes ~25 s on this CPU, and what is tested here is dynamo's tracing and guards, which are
the same whichever backend follows.
"""

import gc

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradmedic as gm
from gradmedic._first_look import FIRST_LOOKS
from tests.helpers import hook_state

STEPS = 20


@pytest.fixture(autouse=True)
def _monitors_of_earlier_tests_collected():
    """A Monitor is in a reference cycle (its probes call back into it), so one an earlier test dropped without
    close() gives back its share of the eager stance when the cyclic collector runs, at a moment that varies
    from run to run. These tests read the stance: they start after that collection, not before."""
    gc.collect()
    assert torch._dynamo.eval_frame._stance.stance == "default"


def deep_sigmoid():
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(7):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


def train(compiled: bool, monitored: bool):
    """20 SGD steps; returns dynamo's counters, the monitor and the model."""
    torch._dynamo.reset()
    counters.clear()
    model = deep_sigmoid()
    runs = torch.compile(model, backend="aot_eager") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(runs, opt, every=5) if monitored else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        loss = nn.functional.cross_entropy(runs(x), y)
        loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()
        opt.zero_grad()
    if mon is not None:
        mon.close()
    seen = {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}
    return seen, mon, model


def test_monitoring_a_compiled_model_adds_no_compile_and_no_graph_break():
    plain, _, _ = train(compiled=True, monitored=False)
    watched, mon, model = train(compiled=True, monitored=True)
    assert plain == {"frames": 1, "graphs": 1, "graph_breaks": 0}
    assert watched == plain
    assert torch._dynamo.eval_frame._stance.stance == "default"  # the user's stance is back after close()
    assert hook_state(model) == hook_state(deep_sigmoid())
    # names are the user's, without torch.compile's _orig_mod. prefix
    assert mon.trace.layers[:4] == ["", "0", "1", "2"] and not any("_orig_mod" in x for x in mon.trace.layers)
    assert mon.trace.meta["model"] == "Sequential"
    assert list(mon.trace.steps) == sorted({0, 5, 10, 15} | set(FIRST_LOOKS))  # every 5th and the first looks


def test_compiled_and_eager_runs_are_diagnosed_alike():
    _, compiled, _ = train(compiled=True, monitored=True)
    _, eager, _ = train(compiled=False, monitored=True)
    a, b = compiled.diagnose(), eager.diagnose()
    assert [(f.kind, f.severity, f.layers) for f in a.findings] == [(f.kind, f.severity, f.layers) for f in b.findings]
    assert any(f.kind == "vanishing_gradients" for f in a.findings)
    # the numbers: AOT autograd may reorder float ops on the compiled steps, so not bit-identical
    for metric in ("grad_norm", "backward_rms"):
        torch.testing.assert_close(torch.from_numpy(compiled.trace.metric(metric)),
                                   torch.from_numpy(eager.trace.metric(metric)), rtol=1e-4, atol=0, equal_nan=True)


def test_two_monitors_in_any_order_restore_the_stance():
    a_model, b_model = deep_sigmoid(), deep_sigmoid()
    a, b = gm.Monitor(a_model, every=1), gm.Monitor(b_model, every=1)
    assert torch._dynamo.eval_frame._stance.stance == "force_eager"
    a.close()
    assert torch._dynamo.eval_frame._stance.stance == "force_eager"  # b still has hooks armed
    b.close()
    assert torch._dynamo.eval_frame._stance.stance == "default"
    c = gm.Monitor(deep_sigmoid(), every=1)
    del c  # dropped without close(): its share is given back when it is collected
    gc.collect()
    assert torch._dynamo.eval_frame._stance.stance == "default"
