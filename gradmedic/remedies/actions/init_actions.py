"""Init actions: the weight scale comes from mean-field theory for this net's depth (``critical_``), the
shape of the draw from the remedy's name (He: normal, Xavier: uniform, orthogonal: orthogonal)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError
from gradmedic._inputs import forward_with_hooks
from gradmedic.remedies import init as inits
from gradmedic.remedies.actions._registry import Patient, action
from gradmedic.remedies.critical import critical_
from gradmedic.remedies.restart import recycle_

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def _critical(patient: Patient, distribution: str, label: str, rid: str) -> str:
    if not any(isinstance(m, _WEIGHTED) for m in patient.model.modules()):
        raise GradmedicError("no Linear/Conv weights to initialise")
    depth = patient.context.depth or None
    scales = critical_(patient.model, patient.inputs, depth=depth, distribution=distribution)
    if patient.treatment is not None:
        patient.treatment.note(rid, depth=depth)  # for Treatment.howto(): the same call in the user's code
    shown = ", ".join(f"{v:.2f} before {k}" for k, v in scales.items() if k != "linear")
    biases = "biases centring the sigmoid outputs" if "Sigmoid" in scales else "biases 0"
    return (f"{label} draw at the critical scale for depth {depth or len(scales)} (sigma_w^2 = {shown or '1'}), "
            f"{biases}")


@action("he_init", "init")
def he_init(patient: Patient) -> str:
    return _critical(patient, "normal", "He (normal)", "he_init")


@action("xavier_init", "init")
def xavier_init(patient: Patient) -> str:
    return _critical(patient, "uniform", "Xavier (uniform)", "xavier_init")


@action("orthogonal_init", "init")
def orthogonal_init(patient: Patient) -> str:
    recurrent = [m for m in patient.model.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
    if recurrent:
        inits.orthogonal_(patient.model, gain=None)  # recurrent matrices gate by gate; Linear/Conv redone below
    text = _critical(patient, "orthogonal", "orthogonal", "orthogonal_init") if any(
        isinstance(m, _WEIGHTED) for m in patient.model.modules()) else ""
    return "; ".join(t for t in (f"orthogonal recurrent weights in {len(recurrent)} RNN(s)" if recurrent else "", text)
                     if t)


@action("lsuv_init", "init", needs_inputs=True)
def lsuv_init(patient: Patient) -> str:
    inits.lsuv_(patient.model, patient.inputs)
    return "LSUV: orthonormal draw, each layer scaled to unit output variance on the batch"


def sequence_length(model: nn.Module, inputs: Any) -> int | None:
    """The longest sequence any nn.RNN/LSTM/GRU of the model sees on ``inputs`` (None without inputs)."""
    if inputs is None:
        return None
    lengths: list[int] = []

    def seen(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            lengths.append(x.shape[1] if module.batch_first else x.shape[0])
        elif isinstance(x, nn.utils.rnn.PackedSequence):
            lengths.append(int(x.batch_sizes.numel()))

    forward_with_hooks(model, inputs, [m for m in model.modules() if isinstance(m, nn.RNNBase)], seen)
    return max(lengths) if lengths else None


# Below this many steps a forget bias of 1 keeps enough (sigmoid(1)^10 = 0.04); chrono init beyond.
CHRONO_MIN_LENGTH = 10


@action("forget_gate_bias", "init")
def forget_gate_bias(patient: Patient) -> str:
    length = sequence_length(patient.model, patient.inputs)
    if length is not None and length >= CHRONO_MIN_LENGTH:
        inits.chrono_bias_(patient.model, length)
        if patient.treatment is not None:
            patient.treatment.note("forget_gate_bias", length=length)
        return f"chrono init of LSTM/GRU gate biases for {length} steps (forget bias log U(1, {length - 1}))"
    inits.forget_gate_bias_(patient.model, 1.0)
    return "LSTM forget-gate biases set to 1 (b_ih + b_hh)"


@action("fixup_init", "init")
def fixup_init(patient: Patient) -> str:
    inits.fixup_(patient.model)
    return "zeroed the last layer of each residual branch (Fixup)"


@action("identity_recurrent_init", "replace")
def identity_recurrent_init(patient: Patient) -> str:
    rnns = [m for m in patient.model.modules() if isinstance(m, nn.RNN)]
    if not rnns:
        raise GradmedicError("no plain nn.RNN")
    for rnn in rnns:
        rnn.nonlinearity = "relu"
        rnn.mode = "RNN_RELU"
    inits.identity_recurrent_(patient.model)
    return f"IRNN: {len(rnns)} RNN(s) switched to ReLU with identity recurrent weights"


@action("recycle_dormant", "revive", keeps_function=True, needs_inputs=True)
def recycle_dormant(patient: Patient) -> str:
    # trained weights: only units that are exactly zero on the batch (tau 0), so that zeroing their outgoing
    # weights leaves the output exactly as it was; fresh ones: ReDo's tau of 0.1
    done = recycle_(patient.model, patient.inputs, tau=0.0 if patient.trained else 0.1, redraw=not patient.trained)
    if not done:
        raise GradmedicError("no dormant unit found")
    units = ", ".join(f"{n} in '{k}'" for k, n in done.items())
    if patient.trained:
        return ("revived dormant units without re-drawing (bias re-centred on the batch, outgoing weights zeroed: "
                f"the output is unchanged): {units}")
    return f"ReDo: re-drew the incoming weights of dormant units, outgoing zeroed: {units}"
