"""The compressed-model format: which weights are stored as PQ codes or int codes, and how.

A compressed layer keeps its ordinary module (nn.Linear, nn.Embedding or a subclass); its weight
comes from a child "provider" (``weight_pq``: PQCodebook, ``weight_int``: ScalarCodes) through
weight_swap. Tied weights share one provider. The state dict names the providers
(``<layer>.weight_pq.*``, ``<layer>.weight_int.*``) and their shapes give their sizes, so a
loader rebuilds the same modules from the checkpoint alone (``attach_from_state_dict``).

Two on-disk forms, both read by the providers' own loading: the training form (the iPQ task's
checkpoints: codes in the smallest integer type, fp32 centroids) and the packed form (packing.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .activations import ActivationQuantizer
from .gptq import quantize_with_error_feedback
from .inference import provider_weight_fn
from .pq import PQCodebook
from .providers import INPUT_CHILD, PQ_CHILD, PROVIDER_CHILDREN, SCALAR_CHILD, is_fitted, provider_of  # noqa: F401  (the format's names)
from .scalar import ScalarCodes
from .schedule import LayerPlan, quantizable_weights
from .weight_swap import add_weight_fn, materialize_attention_weights, route_attention_through_projections


# --- attaching providers ---------------------------------------------------------------------


def _refresh_fitted_flag(provider: nn.Module, *args) -> None:
    if isinstance(provider, PQCodebook):
        provider._qn_fitted = bool(provider.fitted)


def _drop_dense_weight(module: nn.Module, state_dict, prefix, local_metadata) -> None:
    """A quantized layer's stale dense weight is not part of the model."""
    if is_fitted(provider_of(module)):
        state_dict.pop(prefix + "weight", None)


def _fill_dense_weight(module: nn.Module, state_dict, prefix, *args) -> None:
    """Loading a quantized layer into a model that still has the dense Parameter: accept it."""
    if module._parameters.get("weight") is not None and prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = module._parameters["weight"].detach()


@torch.no_grad()
def _sync_dense_weight(module: nn.Module, incompatible_keys) -> None:
    """After loading, the kept dense Parameter equals what the provider computes."""
    provider = provider_of(module)
    weight = module._parameters.get("weight")
    if weight is not None and is_fitted(provider):
        weight.copy_(provider().to(weight.dtype))


def attach_provider(module: nn.Module, child: str, provider: nn.Module) -> None:
    """``module`` computes its weight from ``provider``; once, however many names the module has (shared layers)."""
    if module._modules.get(child) is provider:
        return
    module.add_module(child, provider)
    add_weight_fn(module, provider_weight_fn(module, provider))
    module.register_state_dict_post_hook(_drop_dense_weight)
    module.register_load_state_dict_pre_hook(_fill_dense_weight)
    module.register_load_state_dict_post_hook(_sync_dense_weight)
    if not getattr(provider, "_qn_hooked", False):
        provider._qn_hooked = True
        provider.register_load_state_dict_post_hook(_refresh_fitted_flag)
        _refresh_fitted_flag(provider)


def free_dense_weight(module: nn.Module) -> None:
    """Inference: drop the dense Parameter of a compressed layer (the provider computes it)."""
    module._parameters["weight"] = None


def attach_pq_plan(model: nn.Module, plan: LayerPlan) -> PQCodebook:
    codebook = PQCodebook(plan.shape, plan.block_size, plan.n_centroids)
    if plan.reassign_every:
        codebook.keep_target()
    for name in plan.names:
        attach_provider(model.get_submodule(name), PQ_CHILD, codebook)
    materialize_attention_weights(model)
    return codebook


def mark_fitted(codebook: PQCodebook) -> None:
    """Count a codebook as fitted without k-means (sizes and formats only: its codes and centroids stay as they are)."""
    codebook.fitted.fill_(True)
    _refresh_fitted_flag(codebook)


@torch.no_grad()
def fit_pq(model: nn.Module, plan: LayerPlan, n_iter: int, seed: int, backend: str = "auto",
           importance: Optional[torch.Tensor] = None, hessian: Optional[torch.Tensor] = None,
           row_weights: Optional[torch.Tensor] = None) -> float:
    """k-means the plan's weight into its codebook (``importance``: per-weight error weights; ``hessian``,
    ``row_weights``: the output objective's codes and centroids; see PQCodebook.fit).
    Under torch.distributed rank 0 runs the k-means and broadcasts its centroids and codes (the other ranks
    would only compete for the same cores); returns rank 0's objective."""
    module = model.get_submodule(plan.name)
    codebook = provider_of(module)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    objective = torch.zeros(1, dtype=torch.float64)
    if not distributed or torch.distributed.get_rank() == 0:
        objective.fill_(codebook.fit(module._parameters["weight"], n_iter=n_iter, seed=seed, backend=backend, importance=importance,
                                        hessian=hessian, row_weights=row_weights))
    if distributed:
        for tensor in (codebook.centroids.data, codebook.codes, objective):
            torch.distributed.broadcast(tensor, src=0)
        codebook.fitted.fill_(True)
    _refresh_fitted_flag(codebook)
    return float(objective)


@torch.no_grad()
def reassign_pq(model: nn.Module, plan: LayerPlan, importance: Optional[torch.Tensor] = None) -> tuple[float, float, float]:
    """Move the plan's codes to the nearest centroid of their target weight (PQCodebook.reassign); rank 0 decides
    under torch.distributed and broadcasts the codes. Returns rank 0's (moved fraction, error before, after)."""
    codebook = provider_of(model.get_submodule(plan.name))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    result = torch.zeros(3, dtype=torch.float64)
    if not distributed or torch.distributed.get_rank() == 0:
        result.copy_(torch.tensor(codebook.reassign(importance), dtype=torch.float64))
    if distributed:
        for tensor in (codebook.codes, result):
            torch.distributed.broadcast(tensor, src=0)
    return tuple(result.tolist())


# --- layout ----------------------------------------------------------------------------------


def layout_of(model: nn.Module, fitted_only: bool = True) -> Dict[str, dict]:
    """Plain-dict description of the compressed layers, keyed by their first module name."""
    layout: Dict[str, dict] = {}
    by_provider: Dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        provider = provider_of(module)
        if provider is None or (fitted_only and not is_fitted(provider)):
            continue
        if id(provider) in by_provider:
            layout[by_provider[id(provider)]]["names"].append(name)
            continue
        by_provider[id(provider)] = name
        if isinstance(provider, PQCodebook):
            spec = {"method": "pq", "block_size": provider.block_size, "n_centroids": provider.n_centroids}
        else:
            spec = {"method": "scalar", "bits": provider.bits, "per_channel": provider.per_channel}
        layout[name] = {"names": [name], "shape": list(provider.shape), **spec}
    return layout


def _provider_from_state(state_dict, prefix: str, child: str, shape) -> nn.Module:
    """Rebuild an empty provider of the right kind and size from its saved keys."""
    if child == PQ_CHILD:
        centroids = state_dict.get(prefix + "centroids", state_dict.get(prefix + "centroids_codes"))
        if centroids is None:
            raise ValueError(f"checkpoint key {prefix}centroids is missing: the file is truncated or not a quant-noise checkpoint")
        n_centroids, block_size = centroids.shape
        return PQCodebook(shape, block_size, n_centroids)
    bits = int(state_dict[prefix + "n_bits"])
    scale = state_dict[prefix + "scale"]
    return ScalarCodes(shape, bits, per_channel=scale.numel() > 1)


def attach_from_state_dict(model: nn.Module, state_dict, free_dense: bool = True) -> int:
    """Give ``model`` the compressed layers that ``state_dict`` holds, before it is loaded.

    The state dict says everything needed (``<layer>.weight_pq.*`` / ``<layer>.weight_int.*``
    keys and their shapes); tied layers get one shared provider. With ``free_dense``, quantized
    layers drop their dense Parameter, so inference holds the compressed form only.
    Returns the number of providers attached.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    tied = {name: names for names in quantizable_weights(model).values() for name in names}
    attached = {}
    for key in state_dict:
        for child in PROVIDER_CHILDREN:
            marker = f".{child}."
            if marker not in key:
                continue
            name = key.split(marker)[0]
            if name in attached or provider_of(modules.get(name, nn.Module())) is not None:
                continue
            if name not in modules or modules[name]._parameters.get("weight") is None:
                raise ValueError(f"the checkpoint compresses layer {name}, which this model does not have (another model's checkpoint?)")
            prefix = f"{name}.{child}."
            provider = _provider_from_state(state_dict, prefix, child, modules[name].weight.shape)
            fitted = child == SCALAR_CHILD or bool(state_dict.get(prefix + "fitted", True))
            for module_name in tied.get(name, [name]):
                attach_provider(modules[module_name], child, provider)
                attached[module_name] = provider
            if free_dense and fitted:
                for module_name in tied.get(name, [name]):
                    free_dense_weight(modules[module_name])
    for key in state_dict:
        marker = f".{INPUT_CHILD}."
        if marker in key and INPUT_CHILD not in modules.get(key.split(marker)[0], nn.Module())._modules:
            name = key.split(marker)[0]
            if name not in modules or provider_of(modules[name]) is None:
                raise ValueError(f"the checkpoint quantizes the input of layer {name}, which this model does not have quantized")
            attach_activation_quantizer(modules[name], ActivationQuantizer())
    if attached:
        materialize_attention_weights(model)
    route_int8_attention(model)
    return len({id(p) for p in attached.values()})


@torch.no_grad()
def scalar_quantize_remaining_(model: nn.Module, bits: int, free_dense: bool = True, symmetric: bool = False,
                               per_channel: bool = True, hessians: Optional[Dict[str, Tensor]] = None) -> List[str]:
    """int-``bits`` codes for every Linear/Embedding weight not compressed yet (per-row scales, or one per weight
    without ``per_channel``: the paper's scalar baseline; ``symmetric``: as int8 kernels take them).

    ``hessians`` (weight name -> the input second moments of its Linear use): those weights get their codes by
    error feedback (gptq.py) instead of round-to-nearest, on the same grid."""
    done = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for names in quantizable_weights(model).values():
        if provider_of(modules[names[0]]) is not None:
            continue
        weight = modules[names[0]]._parameters["weight"]
        provider = ScalarCodes(weight.shape, bits, per_channel=per_channel, symmetric=symmetric)
        if hessians is not None and names[0] in hessians:
            provider.set_codes(*quantize_with_error_feedback(weight, hessians[names[0]], bits, per_channel, symmetric))
        else:
            provider.fit(weight)
        for name in names:
            attach_provider(modules[name], SCALAR_CHILD, provider)
            if free_dense:
                free_dense_weight(modules[name])
        done.append(names[0])
    materialize_attention_weights(model)
    return done


# --- int8 activations ------------------------------------------------------------------------


def activation_targets(model: nn.Module) -> List[str]:
    """The Linear layers whose input int8 activations apply to: every Linear with a fitted provider."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and provider_of(module) is not None and is_fitted(provider_of(module))]


def attach_activation_quantizer(module: nn.Module, quantizer: ActivationQuantizer) -> None:
    """From now on the layer computes with int8 inputs (and its int8 weight, on the CPU's int8 kernels).

    Call ``route_int8_attention(model)`` once the model's quantizers are attached.
    """
    if provider_of(module) is None:
        raise ValueError("int8 activations need the layer's weight quantized first")
    module.add_module(INPUT_CHILD, quantizer)  # the int8 form is rebuilt when the quantizer's tensors change (inference.py)


def route_int8_attention(model: nn.Module, names: Sequence[str] = ()) -> int:
    """Attention whose projections take int8 inputs (or are in ``names``) calls them (see weight_swap)."""
    quantized = [name for name, module in model.named_modules() if INPUT_CHILD in module._modules]
    return route_attention_through_projections(model, [*quantized, *names])
