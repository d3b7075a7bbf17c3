"""Make a module compute with a derived weight, without touching its stored parameter.

``add_weight_fn(module, fn)`` installs a forward pre-hook that puts ``fn(stored_weight)`` in the
module's instance ``__dict__`` as ``weight`` (instance attributes shadow ``nn.Module.__getattr__``),
and a forward hook (``always_call=True``, so it also runs when forward raises) that removes it.
The registered Parameter is never reassigned or written: the optimizer, ``state_dict`` and tied
modules keep seeing the real one, and autograd carries gradients from the derived weight back to it.

This one mechanism serves Quant-Noise (derived = noised copy), PQ layers (derived = centroids
gathered by assignments) and int8/int4 layers (derived = dequantized codes), for any module whose
forward reads ``self.weight``: nn.Linear, nn.Embedding and their subclasses.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from torch import Tensor, nn

WeightFn = Callable[[Optional[Tensor]], Optional[Tensor]]
_FNS = "_qn_weight_fns"


def _pre_hook(module: nn.Module, args) -> None:
    weight = module._parameters.get("weight")
    changed = False
    for fn in module.__dict__[_FNS]:
        derived = fn(weight)
        if derived is not None:
            weight, changed = derived, True
    if changed:
        module.__dict__["weight"] = weight


def _post_hook(module: nn.Module, args, output) -> None:
    module.__dict__.pop("weight", None)


def add_weight_fn(module: nn.Module, fn: WeightFn) -> None:
    """Chain ``fn`` onto the weight ``module`` computes with (None from ``fn`` means unchanged)."""
    if _FNS not in module.__dict__:
        module.__dict__[_FNS] = []
        module.register_forward_pre_hook(_pre_hook)
        module.register_forward_hook(_post_hook, always_call=True)
    module.__dict__[_FNS].append(fn)


def weight_fns(module: nn.Module) -> List[WeightFn]:
    return list(module.__dict__.get(_FNS, []))


def route_attention_through_projections(model: nn.Module) -> int:
    """Disable fused attention fast paths that read ``q_proj.weight`` directly.

    fairseq's MultiheadAttention (and its subclasses) call ``F.multi_head_attention_forward`` with
    the projection Parameters, bypassing the projections' forward and therefore their hooks; with
    ``skip_embed_dim_check`` set it computes ``q_proj(query)`` etc. instead (same math).
    Returns how many attention modules were switched.
    """
    switched = 0
    for module in model.modules():
        projections = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if not hasattr(module, "skip_embed_dim_check") or any(p is None for p in projections):
            continue
        if any(weight_fns(p) for p in projections):
            module.skip_embed_dim_check = True
            switched += 1
    return switched
