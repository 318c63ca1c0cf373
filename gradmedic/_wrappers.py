"""The user's model inside the wrappers that training frameworks put around it.

``torch.compile`` returns an ``OptimizedModule`` holding the model as ``_orig_mod``; DDP, DataParallel
and FSDP-1 hold it as ``module``. Hooks go on the inner modules (the wrapper calls them), and names are
read from the inner model, so that layers are named as the user's ``model.named_modules()`` names them,
without ``_orig_mod.`` or ``module.`` in front.

(Minimal on purpose: the architecture table of issue 9 may absorb it.)
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]

# wrapper class name -> attribute holding the wrapped model
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
}


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost user model: wrappers removed, however deeply nested."""
    for _ in range(8):  # wrappers nest a few levels at most (compile around DDP)
        attr = _WRAPPERS.get(type(model).__name__)
        inner = getattr(model, attr, None) if attr else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model
