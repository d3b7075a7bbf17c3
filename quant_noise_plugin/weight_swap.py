"""Make a module compute with a derived weight, without touching its stored parameter.

``add_weight_fn(module, fn)`` installs a forward pre-hook that puts ``fn(stored_weight)`` in the
module's instance ``__dict__`` as ``weight`` (instance attributes shadow ``nn.Module.__getattr__``),
and a forward hook (``always_call=True``, so it also runs when forward raises) that removes it.
The registered Parameter is never reassigned or written: the optimizer, ``state_dict`` and tied
modules keep seeing the real one, and autograd carries gradients from the derived weight back to it.

This one mechanism serves Quant-Noise (derived = noised copy), PQ layers (derived = centroids
gathered by assignments), int8/int4 layers (derived = dequantized codes) and int8 compute
(derived = an int8 weight that F.linear runs on int8 kernels), for any module whose forward reads
``self.weight``: nn.Linear, nn.Embedding and their subclasses. ``add_input_fn`` is its twin for
the input (activation noise).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

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


class ComputedWeight(Tensor):
    """A derived weight that computes ``F.linear`` itself (and ``F.embedding``, where a subclass sets
    ``computes_embedding``); any other use of it sees ``float_value()``. Subclasses: int8_linear.Int8LinearWeight
    (int8 kernels), codes_weight.PQCodesWeight (lookup tables over PQ codes)."""

    computes_embedding = False

    def float_value(self) -> Tensor:
        raise NotImplementedError

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def embedding(self, indices: Tensor, max_norm: Optional[float] = None) -> Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if len(args) >= 2 and isinstance(args[1], cls) and not isinstance(args[0], cls):
            if func is F.linear:
                return args[1].linear(args[0], args[2] if len(args) > 2 else kwargs.get("bias"))
            if func is F.embedding and args[1].computes_embedding:
                return args[1].embedding(args[0], args[3] if len(args) > 3 else kwargs.get("max_norm"))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(value):
            return value.float_value() if isinstance(value, cls) else value

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


InputFn = Callable[[Tensor], Optional[Tensor]]
_INPUT_FNS = "_qn_input_fns"


def _input_pre_hook(module: nn.Module, args):
    if not args or not isinstance(args[0], Tensor):
        return None
    x, changed = args[0], False
    for fn in module.__dict__[_INPUT_FNS]:
        derived = fn(x)
        if derived is not None:
            x, changed = derived, True
    return (x, *args[1:]) if changed else None


def add_input_fn(module: nn.Module, fn: InputFn) -> None:
    """The twin of ``add_weight_fn`` for activations: the module computes with ``fn(input)``
    (None from ``fn`` means unchanged), e.g. a fake-quantized copy of its input."""
    if _INPUT_FNS not in module.__dict__:
        module.__dict__[_INPUT_FNS] = []
        module.register_forward_pre_hook(_input_pre_hook)
    module.__dict__[_INPUT_FNS].append(fn)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ATTENTION_HOOKED = "_qn_attention_hooked"


def _may_fuse(attention: nn.Module, args, kwargs) -> bool:
    """Whether fairseq's MultiheadAttention.forward may take the fused kernel for this call: not while decoding
    incrementally (generation), with a static key/value, or on the path that calls the projections."""
    incremental_state = kwargs.get("incremental_state", args[4] if len(args) > 4 else None)
    static_kv = kwargs.get("static_kv", args[6] if len(args) > 6 else False)
    return incremental_state is None and not static_kv and not getattr(attention, "skip_embed_dim_check", False)


def _attention_pre_hook(attention: nn.Module, args, kwargs) -> None:
    if not _may_fuse(attention, args, kwargs):
        return  # the projections are called, and their own hooks compute their weights
    for name in PROJECTIONS:
        projection = getattr(attention, name)
        if _FNS in projection.__dict__:
            _pre_hook(projection, args)


def _attention_post_hook(attention: nn.Module, args, output) -> None:
    for name in PROJECTIONS:
        getattr(attention, name).__dict__.pop("weight", None)


def materialize_attention_weights(model: nn.Module) -> int:
    """Let fused attention kernels see the derived projection weights too.

    fairseq's MultiheadAttention (and its subclasses) may call ``F.multi_head_attention_forward``
    with ``q_proj.weight`` etc. directly, never calling the projections, so their own hooks do not
    fire. Hooks on the attention module put each projection's derived weight in place for the
    whole attention forward, when it may take the fused path (an unfused one, e.g. incremental decoding,
    calls the projections, whose own hooks compute it: it is not built twice). The fast path stays in
    use. Returns how many attention modules were hooked.
    """
    hooked = 0
    for module in model.modules():
        projections = [getattr(module, n, None) for n in PROJECTIONS]
        if any(not isinstance(p, nn.Module) for p in projections) or module.__dict__.get(_ATTENTION_HOOKED):
            continue
        if any(_FNS in p.__dict__ for p in projections):
            module.__dict__[_ATTENTION_HOOKED] = True
            module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
            module.register_forward_hook(_attention_post_hook, always_call=True)
            hooked += 1
    return hooked


def route_attention_through_projections(model: nn.Module, names: Sequence[str]) -> int:
    """Attention modules with a projection in ``names`` call their projections (fairseq's unfused path).

    fairseq's fused attention hands the q/k/v/out weights to one kernel and never calls the
    projections, so nothing can act on their inputs (activation noise, int8 inputs);
    ``skip_embed_dim_check`` is fairseq's own switch to the path that calls them. Returns how many
    attention modules were switched.
    """
    listed, switched = set(names), 0
    for name, module in model.named_modules():
        if not hasattr(module, "skip_embed_dim_check"):
            continue
        if any(f"{name}.{p}".lstrip(".") in listed for p in PROJECTIONS):
            if not module.skip_embed_dim_check:
                module.__dict__[ROUTED] = True  # ours to undo (fuse_attention_again), not the model's own setting
            module.skip_embed_dim_check = True
            switched += 1
    return switched


ROUTED = "_qn_routed_through_projections"


def fuse_attention_again(attention: nn.Module) -> bool:
    """Undo ``route_attention_through_projections`` for one attention module (when nothing acts on its projections'
    inputs after all); a module that took the unfused path by its own configuration keeps it."""
    if not attention.__dict__.pop(ROUTED, False):
        return False
    attention.skip_embed_dim_check = False
    return True
