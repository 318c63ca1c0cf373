"""Non-finite probe: the first module where a NaN or Inf appears, in the forward and the backward."""

import torch
from torch import nn

import gradmedic as gm
from gradmedic.probes import NonFiniteProbe


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)  # finite at 0, but d sqrt/dx = inf there


def run(model, x):
    mon = gm.Monitor(model, probes=[NonFiniteProbe()])
    model(x).sum().backward()
    mon.step()
    mon.close()
    return mon.trace.events


def test_first_forward_nan_is_the_module_that_made_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh(), Log()), nn.Linear(3, 2))
    events = run(model, -torch.ones(4, 3) * 10)
    forward = [e for e in events if e["phase"] == "forward"]
    assert forward == [{"step": 0, "kind": "nonfinite", "phase": "forward", "module": "1.1", "value": "nan"}]


def test_backward_inf_from_finite_forward():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), Sqrt(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.zero_()
        model[3].weight.fill_(1.0)  # one sign of upstream gradient: +inf everywhere, not +inf meeting -inf
    events = run(model, torch.ones(3, 2))  # ReLU output is 0 -> sqrt'(0) = inf in the backward
    assert [e["phase"] for e in events] == ["backward"]
    # Sqrt's backward makes the first non-finite gradient (w.r.t. its input): Sqrt is named
    assert events[0]["module"] == "2" and events[0]["value"] == "inf"


def test_healthy_model_has_no_events():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    assert run(model, torch.randn(4, 3)) == []



def test_both_phases_in_one_step_each_name_their_own_module_at_every_step():
    # forward: Log on a side branch makes a NaN (nothing downstream reads it); backward: Sqrt at 0 makes the
    # first Inf gradient. Both picks are made together on the device, at each of three steps.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.relu = nn.ReLU()
            self.log = Log()
            self.sqrt = Sqrt()
            self.out = nn.Linear(2, 1)

        def forward(self, x):
            self.log(-torch.ones(1))  # NaN, off the loss's path
            return self.out(self.sqrt(self.relu(self.lin(x)))).sum()

    model = Net()
    with torch.no_grad():
        model.lin.weight.fill_(-1.0)
        model.lin.bias.zero_()
        model.out.weight.fill_(1.0)
    mon = gm.Monitor(model, probes=[NonFiniteProbe()])
    for _ in range(3):
        model(torch.ones(3, 2)).backward()
        mon.step()
    mon.close()
    got = sorted((e["step"], e["phase"], e["module"], e["value"]) for e in mon.trace.events)
    assert got == [(s, phase, module, value) for s in range(3)
                   for phase, module, value in (("backward", "sqrt", "inf"), ("forward", "log", "nan"))]


class _Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, *, features):
        return self.lin(features)


def test_an_inf_that_comes_with_the_batch_is_the_inputs_not_the_first_modules():
    import numpy as np

    from gradmedic.diagnosis.context import Context
    from gradmedic.diagnosis.rules.precision import nonfinite
    from gradmedic.probes.base import Chunk

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    x[0, 0] = float("inf")  # a division by a zero std in someone's preprocessing
    events = run(model, x)
    assert events[0] == {"step": 0, "kind": "nonfinite", "phase": "input", "module": "", "value": "inf"}
    assert [e["phase"] for e in events][:2] == ["input", "forward"]  # the batch first, then what '0' made of it
    trace = gm.Trace({"modules": ["", "0", "1", "2"]})
    trace.extend(Chunk(np.zeros(0, np.int64), [], [], np.zeros((0, 0, 0)), events=events))
    (f,) = nonfinite(trace, Context())
    assert "model's input holds INF at step 0" in f.message and f.layers == [] and f.remedies == ["skip_and_rewind"]
    # given by keyword, as a Hugging Face model's inputs_embeds are
    mon = gm.Monitor(_Keyword(), probes=[NonFiniteProbe()])
    mon.model(features=x).sum().backward()
    mon.step()
    mon.close()
    assert mon.trace.events[0]["phase"] == "input"
    # a finite batch: no input event (the log's NaN is the forward's, as before)
    assert all(e["phase"] != "input" for e in run(model, torch.randn(4, 3)))
