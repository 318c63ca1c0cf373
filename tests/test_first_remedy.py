"""One first remedy everywhere (issue 27): for every kind of finding, on models of each family (a tanh MLP, a ReLU
MLP, a torch.nn post-LN transformer, a Hugging Face BERT, a tanh RNN), the terminal (``str(report)``), the HTML page,
the JSON (``first_remedy``) and ``treat``'s trial order name the same first remedy; one that cannot apply to the model
(a torch.nn-only action on a Hugging Face model) is not offered first. The table of what each action needs
(``order.NEEDS``) is checked against the actions themselves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic._errors import GradmedicError
from gradmedic.diagnosis import KINDS, Finding, Report, prescribe
from gradmedic.remedies.actions import ACTIONS, Patient
from gradmedic.remedies.order import NEEDS, remedy_order
from gradmedic.report import report_page


def _tanh_mlp():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    return model, torch.randn(16, 8)


def _relu_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), torch.randn(16, 8)


def _post_ln():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(4, 6, 16)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn, self.head = cell(4, 8, batch_first=True), nn.Linear(8, 1)

    def forward(self, x):  # (B, T, 4) -> (B, 1), read at the last step
        return self.head(self.rnn(x)[0][:, -1])


def _rnn():
    return _Recurrent(nn.RNN), torch.randn(4, 10, 4)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertForMaskedLM(config), {"input_ids": torch.randint(0, 50, (2, 8))}


MODELS = {"tanh_mlp": _tanh_mlp, "relu_mlp": _relu_mlp, "post_ln": _post_ln, "rnn": _rnn, "bert": _bert}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_terminal_page_json_and_treat_name_the_same_first_remedy_for_every_kind(family):
    torch.manual_seed(0)
    model, x = MODELS[family]()
    looked = gm.check(model, x)
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    for kind in KINDS:
        remedies = prescribe(kind, looked.context)
        finding = Finding(kind, "warning", [], f"a {kind} finding", remedies=remedies)
        report = Report([finding], looked.trace, looked.context)
        first = report.to_dict()["findings"][0]["first_remedy"]
        text = str(report)
        page = report_page(report, figures=False).html()
        order, left_out = remedy_order(finding, report, types=types)  # what treat tries, on this model
        if not remedies:
            assert first is None and "first:" not in text
            continue
        assert f"first: {first} (" in text, (family, kind)
        assert f"({first}; first because" in page, (family, kind)
        if order:
            assert first == order[0], (family, kind, order)
        else:  # nothing treat can do to the model: the recipe's first, else the top-ranked advice
            assert first in remedies
        assert first not in left_out  # never a remedy that cannot apply here


def test_a_post_ln_bert_is_not_offered_a_torch_nn_only_change_first():
    model, x = _bert()
    report = gm.check(model, x)
    finding = Finding("vanishing_gradients", "error", [], "vanishing", remedies=["pre_ln", "lr_warmup", "deepnorm",
                                                                                 "layerscale"])
    doc = Report([finding], report.trace, report.context).to_dict()["findings"][0]
    assert doc["first_remedy"] not in ("pre_ln", "layerscale", "deepnorm")
    assert "does not apply here" in doc["why_first"]
    # the same finding on a torch.nn post-LN transformer: layerscale (a scale) is tried first there
    model, x = _post_ln()
    report = gm.check(model, x)
    assert Report([finding], report.trace, report.context).to_dict()["findings"][0]["first_remedy"] == "layerscale"


@pytest.mark.parametrize("rid", sorted(NEEDS))
def test_what_an_action_needs_is_what_the_action_refuses_without(rid):
    """The table order.py reads from a trace agrees with the action run on a model: it refuses a model holding none of
    the classes it names, and acts on one that holds them."""
    without, x = _relu_mlp()
    patient = Patient(copy.deepcopy(without), x, gm.check(without, x).context, trained=False)
    with pytest.raises(GradmedicError):
        ACTIONS[rid].apply(patient)
    holder = {"RNN": _rnn, "LSTM": lambda: (_Recurrent(nn.LSTM), torch.randn(4, 10, 4)),
              "TransformerEncoderLayer": _post_ln}[NEEDS[rid][0]]
    model, x = holder()
    patient = Patient(copy.deepcopy(model), x, gm.check(model, x).context, trained=False)
    assert isinstance(ACTIONS[rid].apply(patient), str)
