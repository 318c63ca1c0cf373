"""``gm.treat``: apply the prescribed model-side remedies to a copy, and hand back the training recipe.

For each warning or error in the report, worst first, the highest-ranked model-side remedy that applies
to this model is carried out (surgery, init, recycling). With ``inputs``, the copy is checked again after
each round and treatment goes on, to the next remedy in rank, while a finding remains (at most
``max_rounds`` rounds); without inputs, one round is done, and remedies that need a batch (LSUV, ReDo,
residual shapes) are skipped with the reason. Training-side remedies (optimizer, clipping, schedule,
loss scaling) become a recipe of ready objects, since they act on the user's loop, not on the model.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic.diagnosis import REMEDIES, Report
from gradmedic.remedies import init as inits
from gradmedic.remedies import surgery
from gradmedic.remedies.clip import AutoClip, clip_
from gradmedic.remedies.precision import ScaledStep
from gradmedic.remedies.restart import recycle_
from gradmedic.remedies.schedules import warm_restarts

__all__ = ["Treatment", "treat"]


@dataclass
class Treatment:
    """The treated copy, what was done to it and why, and the recipe for the training loop."""

    model: nn.Module
    applied: list[tuple[str, str, str]] = field(default_factory=list)  # (remedy id, what was done, why)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (remedy id, why not)
    recipe: list[str] = field(default_factory=list)  # training-side remedy ids, in the order found
    lr: float = 1e-3
    clip: Callable[[Iterable[torch.Tensor]], torch.Tensor] | None = None
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None
    loss_scaling: bool = False
    report: Report | None = None  # the last check of the treated model (with inputs)

    def optimizer(self, params: Iterable[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """Adam at the recipe's learning rate over ``params`` (the treated model's by default)."""
        return torch.optim.Adam(self.model.parameters() if params is None else params, lr=self.lr)

    def stepper(self, optimizer: torch.optim.Optimizer) -> ScaledStep | None:
        """A ``ScaledStep`` (loss scaling, then clipping) when the recipe calls for loss scaling."""
        return ScaledStep(optimizer, clip=self.clip) if self.loss_scaling else None

    def __str__(self) -> str:
        lines = [f"{rid}: {what} (because {why})" for rid, what, why in self.applied] or ["nothing applied"]
        lines += [f"training recipe: {rid} - {REMEDIES[rid].description}" for rid in self.recipe]
        lines += [f"skipped {rid}: {why}" for rid, why in self.skipped]
        return "\n".join(lines)


def _count(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def _apply(rid: str, model: nn.Module, inputs: Any, context: dict) -> tuple[nn.Module, str]:
    """Carry out one model-side remedy; returns the (possibly new) model and a description.
    Raises GradmedicError with the reason when it cannot apply."""
    if rid == "add_normalization":
        if context.get("normalized"):
            raise GradmedicError("the model is normalised already")
        kind = "layer" if _count(model, (nn.RNNBase, nn.MultiheadAttention)) else "batch"
        before = _count(model, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm))
        model = surgery.add_normalization(model, kind=kind, inputs=inputs, inplace=True)
        added = _count(model, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)) - before
        return model, f"inserted {added} {'BatchNorm' if kind == 'batch' else 'LayerNorm'} layers"
    if rid == "swap_activation":
        saturating = _count(model, surgery._SATURATING)
        if saturating:
            model = surgery.swap_activation(model, to="relu", inplace=True)
            inits.he_(model, inputs)
            return model, f"replaced {saturating} saturating activations with ReLU (He init for them)"
        relus = _count(model, (nn.ReLU,))
        if relus:
            model = surgery.swap_activation(model, to="leaky_relu", replace=(nn.ReLU,), inplace=True)
            return model, f"replaced {relus} ReLU with LeakyReLU(0.01)"
        raise GradmedicError("no activation module to swap")
    if rid == "add_residual":
        if not isinstance(model, nn.Sequential):
            raise GradmedicError("residual blocks are formed from an nn.Sequential's children")
        model = surgery.add_residual(model, inputs=inputs, rezero=True, inplace=True)
        return model, f"wrapped {_count(model, (surgery.Residual,))} same-shape blocks in ReZero residuals"
    if rid in ("he_init", "xavier_init", "orthogonal_init"):
        if not _count(model, (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase)):
            raise GradmedicError("no Linear/Conv/RNN weights to initialise")
        {"he_init": inits.he_, "xavier_init": inits.xavier_,
         "orthogonal_init": functools.partial(inits.orthogonal_, gain=None)}[rid](model, inputs=inputs)
        return model, "re-initialised every Linear/Conv weight for the activation that follows it"
    if rid == "lsuv_init":
        if inputs is None:
            raise GradmedicError("LSUV needs a batch of inputs")
        inits.lsuv_(model, inputs)
        return model, "LSUV: orthonormal init, each layer scaled to unit output variance on the batch"
    if rid == "identity_recurrent_init":
        rnns = [m for m in model.modules() if isinstance(m, nn.RNN)]
        if not rnns:
            raise GradmedicError("no plain nn.RNN")
        for rnn in rnns:
            rnn.nonlinearity = "relu"
            rnn.mode = "RNN_RELU"
        inits.identity_recurrent_(model)
        return model, f"IRNN: {len(rnns)} RNN(s) switched to ReLU with identity recurrent weights"
    if rid == "forget_gate_bias":
        inits.forget_gate_bias_(model, 1.0)
        return model, "LSTM forget-gate biases set to 1"
    if rid == "fixup_init":
        inits.fixup_(model)
        return model, "zeroed the last layer of each residual branch"
    if rid == "gated_recurrence":
        rnns = [m for m in model.modules() if isinstance(m, nn.RNN)]
        if not rnns:
            raise GradmedicError("no plain nn.RNN to replace")
        for rnn in rnns:
            gru = nn.GRU(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
                         dropout=rnn.dropout, bidirectional=rnn.bidirectional)
            weight = next(rnn.parameters())
            surgery._replace(model, rnn, gru.to(weight.device, weight.dtype))
        return model, f"replaced {len(rnns)} tanh RNN(s) with GRU(s) of the same sizes (a drop-in: same outputs)"
    if rid == "recycle_dormant":
        if inputs is None:
            raise GradmedicError("ReDo scores units on a batch of inputs")
        done = recycle_(model, inputs)
        if not done:
            raise GradmedicError("no dormant unit found")
        return model, "re-initialised dormant units: " + ", ".join(f"{n} in '{k}'" for k, n in done.items())
    raise GradmedicError(f"{rid} is advice for a person, not something treat can do to a model")


def _recipe(rid: str, treatment: Treatment) -> None:
    if rid in treatment.recipe:
        return
    treatment.recipe.append(rid)
    if rid == "clip_grad_norm" and treatment.clip is None:
        treatment.clip = functools.partial(clip_, mode="norm", max_norm=1.0)
    elif rid == "clip_grad_value" and treatment.clip is None:
        treatment.clip = functools.partial(clip_, mode="value", clip_value=1.0)
    elif rid == "autoclip" and treatment.clip is None:
        treatment.clip = AutoClip(percentile=10)
    elif rid == "agc" and treatment.clip is None:
        treatment.clip = functools.partial(clip_, mode="agc")
    elif rid == "lower_learning_rate":
        treatment.lr = 1e-4
    elif rid == "lr_warm_restarts":
        treatment.schedule = functools.partial(warm_restarts, period=100)
    elif rid == "loss_scaling":
        treatment.loss_scaling = True


def treat(model: nn.Module, report: Report, inputs: Any = None, targets: Any = None,
          loss_fn: Callable | None = None, max_rounds: int = 3, inplace: bool = False) -> Treatment:
    """Apply the report's model-side remedies to a copy of ``model``; see the module docstring."""
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    if not isinstance(report, Report):
        raise bad_argument("report", "a gradmedic Report (from gm.check or gm.diagnose)", report)
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise bad_argument("model", "a model whose parameters are floating point", bad[0],
                           "treat re-initialises weights, which needs float parameters.")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise bad_argument("max_rounds", "a positive int", max_rounds)
    from gradmedic.check import check  # the diagnosis stage's entry point, used to re-check the copy

    work = model if inplace else copy.deepcopy(model)
    treatment = Treatment(model=work)
    tried: set[str] = set()
    current = report
    for round_ in range(max_rounds):
        pending = [f for f in current.findings if f.severity != "info"]
        if not pending:
            break
        changed = False
        for finding in pending:
            for rid in finding.remedies:
                if REMEDIES[rid].acts_on == "training":
                    _recipe(rid, treatment)
                    continue
                if rid in tried:
                    continue
                tried.add(rid)
                try:
                    work, what = _apply(rid, work, inputs, current.context)
                except GradmedicError as why:
                    treatment.skipped.append((rid, str(why)))
                    continue
                treatment.applied.append((rid, what, f"{finding.severity} {finding.kind} at "
                                                     f"{', '.join(finding.layers[:2]) or 'the model'}"))
                changed = True
                break  # one remedy per finding per round: re-check before doing more
        treatment.model = work
        if not changed or inputs is None:
            break
        current = check(work, inputs, targets=targets, loss_fn=loss_fn)
        treatment.report = current
        if round_ == max_rounds - 1:
            break
    if inputs is None:
        treatment.skipped += [(rid, "needs inputs") for rid in ("lsuv_init", "recycle_dormant")
                              if rid not in tried and any(rid in f.remedies for f in report.findings)]
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in work.parameters()) and \
            any(f.kind == "gradient_underflow" for f in report.findings):
        treatment.loss_scaling = True
    return treatment
