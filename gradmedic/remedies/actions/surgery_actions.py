"""Surgery actions: insert normalisation, add residual paths, swap activations, replace a tanh RNN by a GRU."""

from __future__ import annotations

from torch import nn

from gradmedic._errors import GradmedicError
from gradmedic.architecture import NORM_TYPES, SATURATING_TYPES
from gradmedic.remedies import surgery
from gradmedic.remedies.actions._registry import Patient, action
from gradmedic.remedies.actions.init_actions import CHRONO_MIN_LENGTH, sequence_length
from gradmedic.remedies.critical import critical_
from gradmedic.remedies.init import chrono_bias_


def _count(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


@action("add_normalization", "insert")
def add_normalization(patient: Patient) -> str:
    if patient.context.normalized:
        raise GradmedicError("the model is normalised already")
    kind = "layer" if _count(patient.model, (nn.RNNBase, nn.MultiheadAttention)) else "batch"
    before = _count(patient.model, NORM_TYPES)
    patient.model = surgery.add_normalization(patient.model, kind=kind, inputs=patient.inputs, inplace=True)
    if patient.treatment is not None:
        patient.treatment.note("add_normalization", kind=kind)
    added = _count(patient.model, NORM_TYPES) - before
    return f"inserted {added} {'BatchNorm' if kind == 'batch' else 'LayerNorm'} layers after Linear/Conv layers"


@action("swap_activation", "replace")
def swap_activation(patient: Patient) -> str:
    saturating = _count(patient.model, SATURATING_TYPES)
    if saturating:
        patient.model = surgery.swap_activation(patient.model, to="relu", inplace=True)
        critical_(patient.model, patient.inputs, depth=patient.context.depth or None)
        return f"replaced {saturating} saturating activations with ReLU, with He init for them"
    relus = _count(patient.model, (nn.ReLU,))
    if relus:
        patient.model = surgery.swap_activation(patient.model, to="leaky_relu", replace=(nn.ReLU,), inplace=True)
        if patient.treatment is not None:
            patient.treatment.note("swap_activation", to="leaky_relu")
        return f"replaced {relus} ReLU with LeakyReLU(0.01)"
    raise GradmedicError("no activation module to swap")


@action("add_residual", "insert")
def add_residual(patient: Patient) -> str:
    if not isinstance(patient.model, nn.Sequential):
        raise GradmedicError("residual blocks are formed from an nn.Sequential's children")
    patient.model = surgery.add_residual(patient.model, inputs=patient.inputs, rezero=True, inplace=True)
    return f"wrapped {_count(patient.model, (surgery.Residual,))} same-shape blocks in ReZero residuals (alpha = 0)"


@action("gated_recurrence", "replace")
def gated_recurrence(patient: Patient) -> str:
    rnns = [m for m in patient.model.modules() if isinstance(m, nn.RNN)]
    if not rnns:
        raise GradmedicError("no plain nn.RNN to replace")
    for rnn in rnns:
        gru = nn.GRU(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
                     dropout=rnn.dropout, bidirectional=rnn.bidirectional)
        weight = next(rnn.parameters())
        surgery.replace_module(patient.model, rnn, gru.to(weight.device, weight.dtype))
    length = sequence_length(patient.model, patient.inputs)
    chrono = length is not None and length >= CHRONO_MIN_LENGTH
    if chrono:
        chrono_bias_(patient.model, length)
    return (f"replaced {len(rnns)} tanh RNN(s) with GRU(s) of the same sizes (same inputs and outputs)" +
            (f", update-gate biases chrono-initialised for {length} steps" if chrono else ""))
