"""The pieces of each remedy's rendering (``howto.py`` joins and prints them): one renderer per remedy id of the
catalog, registered with the values it takes and their defaults (the actions' own)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradmedic._errors import bad_argument
from gradmedic.diagnosis import REMEDIES

__all__ = ["GM", "RENDER", "Code", "Parts", "call", "num", "parts_of"]

GM = "gradmedic.remedies"


class Code(str):
    """A value shown as code, not quoted (``Trainer(callbacks=[ModelCheckpoint(...)])``)."""

    def __repr__(self) -> str:
        return str(self)


def num(x: Any) -> str:
    """1e-4 as ``1e-4``, 0.95 as ``0.95``, a tuple of floats likewise, a string in double quotes; anything else as
    ``repr``."""
    if isinstance(x, tuple):
        return "(" + ", ".join(num(v) for v in x) + ("," if len(x) == 1 else "") + ")"
    if isinstance(x, float) and x and (abs(x) < 1e-3 or abs(x) >= 1e5):
        mantissa, exponent = f"{x:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{num(k)}: {num(v)}" for k, v in x.items()) + "}"
    if isinstance(x, str) and not isinstance(x, Code):
        return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(x)


def call(name: str, *args: str, **kwargs: Any) -> str:
    return f"{name}({', '.join([*args, *(f'{k}={num(v)}' for k, v in kwargs.items())])})"


@dataclass
class Parts:
    """A remedy's pieces, before they are joined with another's (one optimizer line for all)."""

    model: list[str] = field(default_factory=list)  # on the model, the same in every framework
    optimizer: dict[str, Any] = field(default_factory=dict)  # torch.optim keyword arguments
    optimizer_class: str | None = None
    params: str | None = None  # the optimizer's first argument, "{m}" for the model ("self" in Lightning)
    scheduler: str | None = None  # on "optimizer"; stepped once per optimizer step
    loop: list[str] = field(default_factory=list)  # in the training loop
    hf: dict[str, Any] = field(default_factory=dict)  # TrainingArguments fields
    hf_code: list[str] = field(default_factory=list)
    pl: dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments
    pl_code: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def join(self, other: Parts) -> None:
        for name in ("model", "loop", "hf_code", "pl_code", "notes"):
            mine = getattr(self, name)
            mine += [line for line in getattr(other, name) if line not in mine]
        for name in ("optimizer", "hf", "pl"):
            getattr(self, name).update(getattr(other, name))
        for name in ("optimizer_class", "params", "scheduler"):
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))


# --- one renderer per remedy id --------------------------------------------------------------------------------
RENDER: dict[str, tuple[Callable[[dict[str, Any]], Parts], dict[str, Any]]] = {}


def _renders(rid: str, **defaults: Any) -> Callable:
    def register(fn: Callable[[dict[str, Any]], Parts]) -> Callable[[dict[str, Any]], Parts]:
        RENDER[rid] = (fn, defaults)
        return fn
    return register


def _model(*lines: str, note: str = "") -> Parts:
    return Parts(model=list(lines), notes=[note] if note else [])


def _in_code(what: str) -> str:
    return f"in the model's own code: {what}"


_LOOP = "  # after loss.backward(), before optimizer.step()"


@_renders("add_normalization", kind="batch")
def _add_normalization(v: dict) -> Parts:
    return _model(f"model = {call(GM + '.add_normalization', 'model', kind=v['kind'], inputs=Code('inputs'))}")


@_renders("swap_activation", to="relu")
def _swap_activation(v: dict) -> Parts:
    return _model(f"model = {call(GM + '.swap_activation', 'model', to=v['to'])}")


@_renders("add_residual")
def _add_residual(v: dict) -> Parts:
    return _model(f"model = {GM}.add_residual(model, inputs=inputs, rezero=True)  # model: an nn.Sequential")


def _critical(distribution: str) -> Callable[[dict], Parts]:
    def render(v: dict) -> Parts:
        extra = {"depth": v["depth"]} if v["depth"] else {}
        return _model(call(GM + ".critical_", "model", "inputs", **extra, distribution=distribution),
                      note="re-draws the weights: for fresh weights, not trained ones")
    return render


_renders("he_init", depth=None)(_critical("normal"))
_renders("xavier_init", depth=None)(_critical("uniform"))
_renders("orthogonal_init", depth=None)(_critical("orthogonal"))


@_renders("lsuv_init")
def _lsuv(v: dict) -> Parts:
    return _model(f"{GM}.lsuv_(model, inputs)")


@_renders("identity_recurrent_init")
def _irnn(v: dict) -> Parts:
    return _model("# build each nn.RNN with nonlinearity=\"relu\", then:", f"{GM}.identity_recurrent_(model)")


@_renders("forget_gate_bias", length=None)
def _forget(v: dict) -> Parts:
    if v["length"]:
        return _model(f"{GM}.chrono_bias_(model, {v['length']})  # sequences of {v['length']} steps")
    return _model(f"{GM}.forget_gate_bias_(model, 1.0)")


@_renders("fixup_init")
def _fixup(v: dict) -> Parts:
    return _model(f"{GM}.fixup_(model)")


@_renders("gated_recurrence")
def _gated(v: dict) -> Parts:
    return _model("# " + _in_code("nn.GRU(input_size, hidden_size, ...) (or nn.LSTM) in place of nn.RNN(input_size, "
                                  "hidden_size, ...)"))


@_renders("recycle_dormant")
def _recycle(v: dict) -> Parts:
    return _model(f"{GM}.recycle_(model, inputs, optimizer)  # every few hundred steps (ReDo)")


@_renders("numerical_guard")
def _guard(v: dict) -> Parts:
    return _model("# " + _in_code("x.clamp_min(1e-12).log() for log(x), x.clamp_min(1e-12).sqrt(), a / (b + 1e-12), "
                                  "F.log_softmax(z, -1) for softmax(z).log()"))


@_renders("gradcheck")
def _gradcheck(v: dict) -> Parts:
    return _model(f"print({GM}.gradcheck(module, x))  # its backward against float64 finite differences")


@_renders("pre_ln")
def _pre_ln(v: dict) -> Parts:
    return _model("# " + _in_code("nn.TransformerEncoderLayer(d_model, nhead, ..., norm_first=True) and a final "
                                  "nn.LayerNorm(d_model) after the stack"),
                  note="a Hugging Face model keeps its norm placement (no config switch): warm the learning rate up")


@_renders("deepnorm")
def _deepnorm(v: dict) -> Parts:
    return _model("# " + _in_code("x = norm(alpha * x + f(x)), alpha = (2 * n_layers) ** 0.25, and the value, output "
                                  "and feed-forward weights scaled by (8 * n_layers) ** -0.25 at init (DeepNorm)"))


@_renders("layerscale", init=0.1)
def _layerscale(v: dict) -> Parts:
    return _model(f"# each residual branch ends in {GM}.LayerScale(d_model, init={num(v['init'])}): "
                  f"x = x + layer_scale(f(x))")


@_renders("qk_norm", inputs=False, norm="rms")
def _qk_norm(v: dict) -> Parts:
    args = ["model", "inputs"] if v["inputs"] else ["model"]
    extra = {"norm": v["norm"]} if v["norm"] != "rms" else {}
    return _model(call(GM + ".qk_norm_", *args, **extra),
                  note="to load the treated state_dict later, build the model, call qk_norm_ on it, then "
                       "load_state_dict")


def _clip_hook(line: str) -> Parts:
    return Parts(loop=[line + _LOOP], hf={"max_grad_norm": 0.0},
                  hf_code=[f"in a TrainerCallback's on_pre_optimizer_step: {line} (max_grad_norm=0 turns the "
                           "Trainer's own clipping off)"],
                  pl_code=["def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, "
                           "gradient_clip_algorithm=None):", f"    {line.replace('model.', 'self.')}"])


@_renders("clip_grad_norm", max_norm=1.0)
def _clip_norm(v: dict) -> Parts:
    return Parts(loop=[f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={num(float(v['max_norm']))})"
                        + _LOOP], hf={"max_grad_norm": float(v["max_norm"])},
                  pl={"gradient_clip_val": float(v["max_norm"]), "gradient_clip_algorithm": "norm"})


@_renders("clip_grad_value", clip_value=1.0)
def _clip_value(v: dict) -> Parts:
    parts = _clip_hook(f"torch.nn.utils.clip_grad_value_(model.parameters(), clip_value={num(float(v['clip_value']))})")
    parts.pl, parts.pl_code = {"gradient_clip_val": float(v["clip_value"]), "gradient_clip_algorithm": "value"}, []
    return parts


@_renders("autoclip", percentile=10)
def _autoclip(v: dict) -> Parts:
    made = f"clipper = {GM}.AutoClip(percentile={v['percentile']})"
    parts = _clip_hook("clipper(model.parameters())")
    parts.loop.insert(0, made + "  # once, before the loop")
    parts.hf_code.insert(0, made + "  # once, before the Trainer")
    parts.pl_code.insert(0, f"# {made}, once, in the LightningModule's __init__")
    return parts


@_renders("agc", clip_factor=0.01)
def _agc(v: dict) -> Parts:
    return _clip_hook(f"{GM}.adaptive_clip_grad_(model.parameters(), clip_factor={num(v['clip_factor'])})")


def _lr(lr: float | None, cls: str | None = None) -> Parts:
    parts = Parts(optimizer={"lr": lr} if lr is not None else {}, optimizer_class=cls)
    if lr is not None:
        parts.hf["learning_rate"] = lr
    return parts


@_renders("lower_learning_rate", lr=1e-4)
def _lower_lr(v: dict) -> Parts:
    return _lr(v["lr"])


@_renders("raise_learning_rate", lr=1e-2)
def _raise_lr(v: dict) -> Parts:
    return _lr(v["lr"])


@_renders("adaptive_optimizer", lr=1e-3)
def _adaptive(v: dict) -> Parts:
    parts = _lr(v["lr"], "torch.optim.Adam")
    parts.hf["optim"] = "adamw_torch"
    return parts


@_renders("lr_warm_restarts", period=100)
def _restarts(v: dict) -> Parts:
    return Parts(scheduler=f"torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0={v['period']})",
                  hf={"lr_scheduler_type": "cosine_with_restarts"},
                  notes=[f"the Trainer's restarts come from lr_scheduler_kwargs={{\"num_cycles\": max_steps // "
                         f"{v['period']}}}"])


def _warmup_field(ratio: float) -> tuple[str, float]:
    """``warmup_ratio`` before transformers 5; from 5 on a float ``warmup_steps`` below 1 is the ratio."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major = 5
    return ("warmup_steps" if major >= 5 else "warmup_ratio"), float(ratio)


@_renders("lr_warmup", steps=100, ratio=None)
def _warmup(v: dict) -> Parts:
    steps = v["steps"]
    parts = Parts(scheduler=f"torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / "
                             f"{steps}))")
    name, value = _warmup_field(v["ratio"]) if v["ratio"] is not None else ("warmup_steps", int(steps))
    parts.hf[name] = value
    return parts


@_renders("loss_scaling")
def _scaling(v: dict) -> Parts:
    return Parts(loop=["scaler = torch.amp.GradScaler(device_type)  # once, before the loop; device_type: \"cuda\"...",
                        "with torch.autocast(device_type, dtype=torch.float16):", "    loss = loss_fn(model(x), y)",
                        "scaler.scale(loss).backward()", "scaler.unscale_(optimizer)  # clip here, after unscaling",
                        "scaler.step(optimizer)", "scaler.update()"],
                  hf={"fp16": True}, pl={"precision": "16-mixed"})


@_renders("higher_precision", precision="bfloat16")
def _higher(v: dict) -> Parts:
    if v["precision"] == "float32":
        return Parts(loop=["model.float()  # and no float16 autocast around the forward"],
                      hf={"fp16": False, "bf16": False}, pl={"precision": "32-true"})
    return Parts(loop=["with torch.autocast(device_type, dtype=torch.bfloat16):  # not float16; weights stay float32",
                        "    loss = loss_fn(model(x), y)"],
                  hf={"bf16": True, "fp16": False}, pl={"precision": "bf16-mixed"},
                  notes=["bfloat16 has float32's range: nothing overflows or flushes to zero, and no loss scale is "
                         "needed"])


@_renders("loss_scale_floor")
def _floor(v: dict) -> Parts:
    parts = _higher({"precision": "bfloat16"})
    parts.loop = ["print(gradmedic.check(model, inputs))  # names the layer whose float16 output overflows",
                  "with torch.autocast(device_type, enabled=False):  # in that layer's forward: float32 there",
                  "    y = layer(x.float())"]
    parts.notes = ["or train in bfloat16 (below), which needs no loss scale"]
    return parts


@_renders("z_loss", coef=1e-4)
def _z(v: dict) -> Parts:
    term = f"{GM}.z_loss(logits, coef={num(float(v['coef']))})"
    return Parts(loop=[f"loss = loss_fn(logits, targets) + {term}"],
                  hf_code=["in a Trainer subclass: def compute_loss(self, model, inputs, return_outputs=False, "
                           "**kwargs): outputs = model(**inputs); loss = outputs.loss + "
                           f"{term.replace('logits', 'outputs.logits', 1)}"],
                  pl_code=[f"in training_step: loss = loss + {term}"])


@_renders("lower_adam_epsilon", eps=1e-15)
def _eps(v: dict) -> Parts:
    return Parts(optimizer={"eps": float(v["eps"])}, hf={"adam_epsilon": float(v["eps"])})


@_renders("lower_beta2", beta2=0.95, beta1=0.9)
def _beta2(v: dict) -> Parts:
    return Parts(optimizer={"betas": (float(v["beta1"]), float(v["beta2"]))}, hf={"adam_beta2": float(v["beta2"])})


@_renders("weight_decay_exclusions", weight_decay=0.1)
def _decay(v: dict) -> Parts:
    wd = float(v["weight_decay"])
    return Parts(optimizer_class="torch.optim.AdamW", params=f"{GM}.decay_groups({{m}}, weight_decay={num(wd)})",
                  hf={"weight_decay": wd},
                  notes=["the Trainer leaves biases and LayerNorm weights out of the decay but decays embeddings; "
                         "to leave them out too, override Trainer.create_optimizer with decay_groups"])


@_renders("skip_and_rewind", every=100)
def _rewind(v: dict) -> Parts:
    every = v["every"]
    return Parts(loop=[f"if step % {every} == 0: torch.save({{\"model\": model.state_dict(), \"optimizer\": "
                        'optimizer.state_dict(), "step": step}, f"ckpt_{step}.pt")',
                        f"# on a spike: load the checkpoint ~{every} steps before it and skip the batches from there "
                        "to the spike"],
                  hf={"save_steps": every}, hf_code=["after a spike: trainer.train(resume_from_checkpoint=path)"],
                  pl={"callbacks": Code(f"[ModelCheckpoint(every_n_train_steps={every}, save_top_k=-1)]")},
                  pl_code=["after a spike: trainer.fit(model, ckpt_path=path)"])


@_renders("accumulate", steps=4)
def _accumulate(v: dict) -> Parts:
    return Parts(loop=[f"loss = {GM}.accumulate(model, loss_fn, micro_batches)  # {v['steps']} micro-batches: "
                        "instead of loss.backward(); then optimizer.step()"],
                  hf={"gradient_accumulation_steps": v["steps"]}, pl={"accumulate_grad_batches": v["steps"]})


def parts_of(rid: str, values: Mapping[str, Any], strict: bool = True) -> Parts:
    """Remedy ``rid``'s pieces with ``values`` over its defaults; unknown ids are refused, and unknown value names
    too unless ``strict=False`` (a Treatment's recorded values: the names this renderer does not take are left)."""
    if rid not in REMEDIES or rid not in RENDER:
        raise bad_argument("remedy", "a remedy id of gradmedic.REMEDIES", rid)
    fn, defaults = RENDER[rid]
    unknown = sorted(set(values) - set(defaults))
    if not strict:
        values, unknown = {k: v for k, v in values.items() if k in defaults}, []
    if unknown:
        raise bad_argument(f"values of {rid}", f"among {sorted(defaults) or 'none'}", unknown)
    return fn({**defaults, **values})
