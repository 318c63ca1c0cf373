"""Every remedy in the user's own terms: a call in plain PyTorch, the Hugging Face ``TrainingArguments`` fields, the
Lightning ``Trainer`` arguments (and what goes in ``configure_optimizers``/``training_step`` instead).

``howto(remedy_id, **values)`` renders one remedy of the catalog (``gradmedic.diagnosis.REMEDIES``) with the values a
``Treatment`` chose (or the actions' defaults); ``Treatment.howto()`` renders everything a treatment applied and put
in its recipe as one ``HowTo``, with a single optimizer line. The field and argument names are those of the installed
``transformers``/``lightning`` (tests/test_howto.py builds a ``TrainingArguments`` and a ``Trainer`` from them); the
warmup ratio is ``warmup_ratio`` before transformers 5 and a float ``warmup_steps`` from 5 on. Nothing here imports
either framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradmedic.remedies.howto_parts import Parts, call, parts_of

__all__ = ["HowTo", "howto", "howto_all", "treatment_howto"]


@dataclass(frozen=True)
class HowTo:
    """Remedies in the user's own terms. ``torch``: lines of plain PyTorch; ``huggingface``: the
    ``TrainingArguments(...)`` fields and what the Trainer cannot set; ``lightning``: the ``Trainer(...)``
    arguments and what goes in the LightningModule; ``note``: what to know. ``hf_fields``/``lightning_args``: the
    same fields and arguments as a mapping (values as Python objects; ``Code`` where they are code)."""

    remedies: tuple[str, ...]
    torch: str
    huggingface: str
    lightning: str
    note: str = ""
    hf_fields: Mapping[str, Any] = field(default_factory=dict)
    lightning_args: Mapping[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """For a terminal: "PyTorch: ...", "Hugging Face: ...", "Lightning: ..." (further lines indented), a note."""
        out: list[str] = []
        for label, text in (("PyTorch", self.torch), ("Hugging Face", self.huggingface), ("Lightning", self.lightning)):
            first, *rest = text.splitlines() or [""]
            out.append(f"{label}: {first}")
            out += ["    " + line for line in rest]
        if self.note:
            out.append(f"note: {self.note}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# --- rendering --------------------------------------------------------------------------------------------------
def _optimizer(parts: Parts, who: str) -> str | None:
    if not (parts.optimizer or parts.optimizer_class or parts.params):
        return None
    params = (parts.params or "{m}.parameters()").format(m=who)
    return call(parts.optimizer_class or "torch.optim.AdamW", params, **parts.optimizer)


def _render(remedies: tuple[str, ...], parts: Parts, given_class: bool = False) -> HowTo:
    mine = "" if given_class or parts.optimizer_class else "  # your optimizer's class, with these arguments"
    torch_lines = list(parts.model)
    optimizer = _optimizer(parts, "model")
    if optimizer:
        torch_lines.append(f"optimizer = {optimizer}{mine}")
    if parts.scheduler:
        torch_lines.append(f"scheduler = {parts.scheduler}  # scheduler.step() after each optimizer.step()")
    torch_lines += parts.loop
    hf_lines = [call("TrainingArguments", **parts.hf)] if parts.hf else []
    pl_lines = [call("Trainer", **parts.pl)] if parts.pl else []
    if parts.model:
        which = "change" if len(parts.model) == 1 else "changes"
        hf_lines.append(f"the model {which} above (PyTorch), before Trainer(model=model, ...)")
        pl_lines.append(f"the model {which} above (PyTorch), in the LightningModule's __init__")
    hf_lines += parts.hf_code
    pl_optimizer = _optimizer(parts, "self")
    if pl_optimizer or parts.scheduler:
        pl_lines += ["def configure_optimizers(self):",
                     f"    optimizer = {pl_optimizer or 'torch.optim.AdamW(self.parameters())  # yours'}"]
        if parts.scheduler:
            pl_lines += [f"    scheduler = {parts.scheduler}",
                         '    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, '
                         '"interval": "step"}}']
        else:
            pl_lines.append("    return optimizer")
    pl_lines += parts.pl_code
    return HowTo(remedies, "\n".join(torch_lines) or "# nothing to change",
                 "\n".join(hf_lines) or "nothing to change", "\n".join(pl_lines) or "nothing to change",
                 "; ".join(parts.notes), dict(parts.hf), dict(parts.pl))


def howto(remedy: str, **values: Any) -> HowTo:
    """Remedy ``remedy`` (an id of ``gradmedic.REMEDIES``) in the user's own terms, with ``values`` as a
    ``Treatment`` chose them (e.g. ``howto("clip_grad_norm", max_norm=0.5)``, ``howto("lr_warmup", steps=200)``
    or ``ratio=0.1``, ``howto("lower_learning_rate", lr=3e-4)``); without them, the actions' defaults."""
    return _render((remedy,), parts_of(remedy, values))


def howto_all(items: Iterable[tuple[str, Mapping[str, Any]]]) -> HowTo:
    """Several remedies as one ``HowTo`` (one optimizer line, one ``TrainingArguments(...)``, one ``Trainer(...)``):
    ``items`` are (remedy id, values)."""
    joined, ids = Parts(), []
    for rid, values in items:
        joined.join(parts_of(rid, values))
        ids.append(rid)
    return _render(tuple(ids), joined)


_OPTIMIZER_REMEDIES = {"lower_learning_rate", "raise_learning_rate", "adaptive_optimizer", "lower_adam_epsilon",
                       "lower_beta2", "weight_decay_exclusions"}


def _class_name(cls: type) -> str:
    module = cls.__module__
    return f"torch.optim.{cls.__name__}" if module.startswith("torch.optim") else f"{module}.{cls.__qualname__}"


def treatment_howto(treatment: Any) -> HowTo:
    """A ``Treatment``'s applied remedies and recipe as one ``HowTo``; its optimizer line is the recipe's optimizer
    (class, learning rate, epsilon, betas, weight decay as the treatment holds them)."""
    values = getattr(treatment, "values", {}) or {}
    items = [(rid, values.get(rid, {})) for rid, _, _ in treatment.applied]
    items += [(rid, values.get(rid, {})) for rid in treatment.recipe]
    joined, ids = Parts(), []
    for rid, v in items:
        joined.join(parts_of(rid, v, strict=False))
        ids.append(rid)
    if _OPTIMIZER_REMEDIES & set(ids):
        joined.optimizer_class = _class_name(treatment.optimizer_class)
        kwargs: dict[str, Any] = {"lr": treatment.lr}
        defaults = treatment.optimizer_defaults or {}
        if treatment.beta2 is not None:
            kwargs["betas"] = (float(tuple(defaults.get("betas") or (0.9, 0.999))[0]), treatment.beta2)
        if treatment.eps is not None:
            kwargs["eps"] = treatment.eps
        if treatment.weight_decay is not None and not treatment.decay_exclusions:
            kwargs["weight_decay"] = treatment.weight_decay
        joined.optimizer = kwargs
        joined.hf["learning_rate"] = treatment.lr
    return _render(tuple(ids), joined, given_class=True)
