"""Initialisation remedies, on ``torch.nn.init`` underneath; the value added is choosing per layer.

- ``he_`` (He et al. 2015) and ``xavier_`` (Glorot & Bengio 2010) take the gain of the activation that
  *actually follows* each layer (found by running one forward pass, or from the module order), so a
  Linear before a Tanh gets tanh's gain and one before a ReLU gets ReLU's.
- ``orthogonal_`` (Saxe et al. 2014), also for recurrent weight matrices, gate by gate.
- ``lsuv_`` (Mishkin & Matas 2016): orthonormal init, then rescale each layer in forward order until its
  output variance on a batch is 1 within ``tol`` (at most ``max_iter`` passes per layer).
- ``identity_recurrent_`` (Le et al. 2015, IRNN): recurrent weights = identity, recurrent biases 0.
- ``forget_gate_bias_`` (Gers et al. 2000): LSTM forget-gate bias set so that the two biases sum to 1.
- ``fixup_`` (Zhang et al. 2019): the last layer of each residual branch starts at zero.
- ``chrono_bias_`` (Tallec & Ollivier 2018): gate biases for sequences of length T, so that the units'
  memory time scales spread over 1..T: an LSTM's forget bias ``log(U(1, T - 1))``, a GRU's update bias
  the same (PyTorch's GRU keeps ``z * h_{t-1}``). A forget bias of 1 keeps ``sigmoid(1)^T`` of the
  gradient, 2e-14 over 100 steps; chrono biases keep it at the scale of T. The paper also sets the input
  bias to minus the forget bias; that makes the cell write 1/T of each input, and on a recall task
  (tests/treat_zoo.py, T = 60) it trained slower than leaving the input gate as it is (MSE 0.06 against
  0.014 after 300 Adam steps), so the input gate is left alone.

Each function works in place on the given module (returns it), touches only weights it understands,
and returns without change on modules it has nothing to do for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic._inputs import forward_with_hooks, run_forward
from gradmedic.architecture import NORM_TYPES, parametrization_parts
from gradmedic.remedies._weights import writable_weight

__all__ = ["chrono_bias_", "fixup_", "following_activations", "forget_gate_bias_", "he_", "identity_recurrent_",
           "lsuv_", "orthogonal_", "xavier_"]

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)

# torch.nn.init.calculate_gain names for the activation modules
_GAIN_NAME: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu"), (nn.LeakyReLU, "leaky_relu"), (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"), (nn.SELU, "selu"), (nn.GELU, "relu"), (nn.SiLU, "relu"), (nn.ELU, "relu"),
)


def gain_name(module: nn.Module | None) -> tuple[str, float | None]:
    if module is None:
        return "linear", None
    for kind, name in _GAIN_NAME:
        if isinstance(module, kind):
            slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else None
            return name, slope
    return "linear", None


def _stand_in(func: Any, args: tuple, kwargs: dict) -> nn.Module | None:
    """The activation module a functional call stands for (``torch.sigmoid(x)`` -> ``nn.Sigmoid()``), or None."""
    name = getattr(func, "__name__", "").rstrip("_")
    if name in ("relu", "relu6", "sigmoid", "tanh", "gelu", "silu", "elu", "selu", "mish", "softsign", "hardtanh"):
        if name == "hardtanh":
            return nn.Hardtanh(float(kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)),
                               float(kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)))
        return {"relu": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
                "silu": nn.SiLU, "elu": nn.ELU, "selu": nn.SELU, "mish": nn.Mish, "softsign": nn.Softsign}[name]()
    if name == "leaky_relu":
        return nn.LeakyReLU(float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)))
    return None


class _FunctionalActivations(TorchFunctionMode):
    """Records the activation functions a forward calls outside any leaf module (``torch.sigmoid(self.fc(x))``), as
    stand-in modules in the forward order, with their outputs. Inside a leaf (``nn.ReLU`` calls ``F.relu``) the
    module itself is what counts."""

    def __init__(self, order: list[nn.Module], outputs: dict[int, torch.Tensor]):
        super().__init__()
        self.order, self.outputs, self.inside_leaf = order, outputs, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.inside_leaf and isinstance(out, torch.Tensor):
            stand_in = _stand_in(func, args, kwargs)
            if stand_in is not None:
                self.outputs[len(self.order)] = out.detach()
                self.order.append(stand_in)
        return out


@torch.no_grad()
def forward_order(model: nn.Module, inputs: Any) -> tuple[list[nn.Module], dict[int, torch.Tensor]]:
    """The leaf modules and functional activations of one no-grad forward, in the order they ran (a functional
    activation as a stand-in module, ``nn.Sigmoid()`` for ``torch.sigmoid``), and the output of each activation
    call by its place in that order."""
    order: list[nn.Module] = []
    outputs: dict[int, torch.Tensor] = {}
    leaves = _leaves(model)
    watch = _FunctionalActivations(order, outputs)

    def enter(module: nn.Module, args: Any) -> None:
        watch.inside_leaf += 1

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        watch.inside_leaf -= 1
        if gain_name(module)[0] != "linear" and isinstance(output, torch.Tensor):
            outputs[len(order)] = output.detach()
        order.append(module)

    handles = [m.register_forward_pre_hook(enter) for m in leaves]
    handles += [m.register_forward_hook(leave, always_call=True) for m in leaves]
    try:
        with watch:
            run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order, outputs


def following_activations(model: nn.Module, inputs: Any = None) -> dict[nn.Module, nn.Module | None]:
    """For each Linear/Conv layer, the activation module that consumes its output (or None).

    With ``inputs``, one forward pass records the order in which modules ran; without, the order of
    ``named_modules`` (right for Sequential models). Normalisation layers in between are looked through.
    """
    return _following(forward_order(model, inputs)[0] if inputs is not None else _leaves(model))


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The modules without children, in definition order; a weight-normed layer's parametrization is no child of
    note (the layer is the leaf)."""
    parts = parametrization_parts(model)
    return [m for m in model.modules() if id(m) not in parts and not any(id(c) not in parts for c in m.children())]


def _following(order: list[nn.Module]) -> dict[nn.Module, nn.Module | None]:
    """Each weighted layer of ``order`` (a forward order) -> the activation that runs next after it, or None."""
    return {layer: None if at is None else order[at] for layer, at in following_positions(order).items()}


def following_positions(order: list[nn.Module]) -> dict[nn.Module, int | None]:
    """Each weighted layer of ``order`` (a forward order, its first call) -> the place in ``order`` of the activation
    that runs next after it (norms and dropout looked through), or None: a place, not a module, since one activation
    module may follow several layers (``forward_order``'s outputs are per place)."""
    result: dict[nn.Module, int | None] = {}
    for i, module in enumerate(order):
        if not isinstance(module, _WEIGHTED) or module in result:
            continue
        nxt = None
        for j in range(i + 1, len(order)):
            later = order[j]
            if isinstance(later, (*NORM_TYPES, nn.Dropout)):
                continue
            nxt = j if gain_name(later)[0] != "linear" else None
            break
        result[module] = nxt
    return result


def _weighted(model: nn.Module) -> Iterable[nn.Module]:
    return (m for m in model.modules() if isinstance(m, _WEIGHTED))


def he_(model: nn.Module, inputs: Any = None, mode: str = "fan_in") -> nn.Module:
    """He/Kaiming normal init with the gain of the following activation; biases to zero."""
    if mode not in ("fan_in", "fan_out"):
        raise bad_argument("mode", '"fan_in" or "fan_out"', mode)
    follows = following_activations(model, inputs)
    for module in _weighted(model):
        name, slope = gain_name(follows.get(module))
        with writable_weight(module) as weight:
            if name in ("relu", "leaky_relu"):
                nn.init.kaiming_normal_(weight, a=slope or 0.0, mode=mode, nonlinearity=name)
            else:  # He's derivation is for rectifiers; other layers keep variance with the plain gain
                gain = nn.init.calculate_gain(name)
                fan = nn.init._calculate_correct_fan(weight, mode)
                with torch.no_grad():
                    weight.normal_(0.0, gain / math.sqrt(fan))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def xavier_(model: nn.Module, inputs: Any = None, uniform: bool = True) -> nn.Module:
    """Xavier/Glorot init with the gain of the following activation; biases to zero."""
    follows = following_activations(model, inputs)
    for module in _weighted(model):
        name, slope = gain_name(follows.get(module))
        gain = nn.init.calculate_gain(name, slope)
        with writable_weight(module) as weight:
            (nn.init.xavier_uniform_ if uniform else nn.init.xavier_normal_)(weight, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def _recurrent_weights(model: nn.Module) -> Iterable[tuple[nn.Module, str, torch.Tensor]]:
    for module in model.modules():
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            for name, p in module.named_parameters(recurse=False):
                yield module, name, p


def _gates(module: nn.Module) -> int:
    mode = getattr(module, "mode", None) or type(module).__name__
    return 4 if "LSTM" in mode else 3 if "GRU" in mode else 1


def orthogonal_(model: nn.Module, gain: float | None = None, inputs: Any = None) -> nn.Module:
    """Orthogonal weights (each recurrent gate block separately); biases to zero."""
    follows = following_activations(model, inputs)
    for module in _weighted(model):
        g = gain if gain is not None else nn.init.calculate_gain(*gain_name(follows.get(module)))
        with writable_weight(module) as weight:
            nn.init.orthogonal_(weight, gain=g)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    for module, name, p in _recurrent_weights(model):
        if name.startswith("weight"):
            for block in p.detach().chunk(_gates(module), dim=0):
                nn.init.orthogonal_(block, gain=1.0 if gain is None else gain)
        elif name.startswith("bias"):
            nn.init.zeros_(p)
    return model


def identity_recurrent_(model: nn.Module, scale: float = 1.0) -> nn.Module:
    """IRNN: identity recurrent matrices (times ``scale``) and zero recurrent biases, for ReLU RNNs."""
    touched = False
    for module, name, p in _recurrent_weights(model):
        if _gates(module) != 1:
            continue
        with torch.no_grad():
            if name.startswith("weight_hh"):
                p.copy_(torch.eye(p.shape[0], p.shape[1], dtype=p.dtype, device=p.device) * scale)
                touched = True
            elif name.startswith("bias_hh") or name.startswith("bias_ih"):
                p.zero_()
    if not touched:
        raise GradmedicError("identity_recurrent_ found no nn.RNN/nn.RNNCell in the model; it applies to plain "
                             "RNNs (use forget_gate_bias_ for LSTMs).")
    return model


def forget_gate_bias_(model: nn.Module, value: float = 1.0) -> nn.Module:
    """LSTM forget-gate biases: b_ih + b_hh = ``value`` for the forget gate (PyTorch gate order i, f, g, o)."""
    touched = False
    for module, name, p in _recurrent_weights(model):
        if _gates(module) != 4 or not name.startswith("bias"):
            continue
        hidden = p.shape[0] // 4
        with torch.no_grad():
            p[hidden:2 * hidden].fill_(value / 2)  # split between b_ih and b_hh
        touched = True
    if not touched:
        raise GradmedicError("forget_gate_bias_ found no LSTM with biases in the model; it applies to nn.LSTM and "
                             "nn.LSTMCell built with bias=True.")
    return model


def chrono_bias_(model: nn.Module, length: int) -> nn.Module:
    """Chrono init of LSTM/GRU gate biases for sequences of ``length`` steps (split between b_ih and b_hh)."""
    if not isinstance(length, int) or length < 3:
        raise bad_argument("length", "an int >= 3 (the sequence length the memory should span)", length)
    touched = False
    draws: dict[tuple[int, str], torch.Tensor] = {}  # one draw per layer, split between b_ih and b_hh
    for module, name, p in _recurrent_weights(model):
        gates = _gates(module)
        if gates == 1 or not name.startswith("bias"):
            continue
        hidden = p.shape[0] // gates
        key = (id(module), "_".join(name.split("_")[2:]))
        if key not in draws:
            draws[key] = torch.log(torch.empty(hidden, dtype=torch.float64).uniform_(1.0, length - 1.0))
        keep = (draws[key] / 2).to(p.dtype)
        with torch.no_grad():
            p[hidden:2 * hidden].copy_(keep)  # LSTM gates i, f, g, o; GRU gates r, z, n: the second block
        touched = True
    if not touched:
        raise GradmedicError("chrono_bias_ found no LSTM/GRU with biases in the model; it applies to nn.LSTM, "
                             "nn.GRU and their cells built with bias=True.")
    return model


def lsuv_(model: nn.Module, inputs: Any, tol: float = 0.1, max_iter: int = 10) -> nn.Module:
    """LSUV: orthonormal init, then scale each layer (in forward order) to unit output variance on ``inputs``."""
    if not (isinstance(tol, float) and 0 < tol < 1):
        raise bad_argument("tol", "a float in (0, 1)", tol)
    orthogonal_(model, gain=1.0)
    order: list[nn.Module] = []
    forward_with_hooks(model, inputs, _weighted(model), lambda mod, a, o: order.append(mod))
    for module in dict.fromkeys(order):  # forward order, each layer once
        captured: dict[str, torch.Tensor] = {}
        for _ in range(max_iter):
            forward_with_hooks(model, inputs, [module], lambda mod, a, o, store=captured: store.update(out=o))
            var = captured["out"].float().var()
            if abs(float(var) - 1.0) < tol or float(var) == 0.0:
                break
            with writable_weight(module) as weight, torch.no_grad():
                weight.div_(torch.sqrt(var).to(weight.dtype))
    return model


def fixup_(model: nn.Module) -> nn.Module:
    """Zero the last weighted layer of every residual branch (``gradmedic`` residual wrappers and any module
    that exposes ``.branch``), so each block starts as the identity (Fixup, Zhang et al. 2019)."""
    touched = False
    for module in model.modules():
        branch = getattr(module, "branch", None)
        if not isinstance(branch, nn.Module):
            continue
        last = [m for m in branch.modules() if isinstance(m, _WEIGHTED)]
        if last:
            with writable_weight(last[-1]) as weight:
                nn.init.zeros_(weight)
            if last[-1].bias is not None:
                nn.init.zeros_(last[-1].bias)
            touched = True
    if not touched:
        raise GradmedicError("fixup_ found no residual branch (a module with a .branch attribute, as "
                             "gradmedic.remedies.add_residual makes); add residual connections first.")
    return model
