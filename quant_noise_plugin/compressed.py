"""The compressed-model format: which weights are stored as PQ codes or int codes, and how.

A compressed layer keeps its ordinary module (nn.Linear, nn.Embedding or a subclass); its weight
comes from a child "provider" (``weight_pq``: PQCodebook, ``weight_int``: ScalarCodes) through
weight_swap. Tied weights share one provider. The state dict names the providers
(``<layer>.weight_pq.*``, ``<layer>.weight_int.*``) and their shapes give their sizes, so a
loader rebuilds the same modules from the checkpoint alone (``attach_from_state_dict``).

Two on-disk forms, both loaded by the same hooks:
- training form (the iPQ task's checkpoints): codes in the smallest integer type, fp32 centroids;
- packed form (``pack_state_dict``): codes bit-packed, centroids fp16 or int8/int4, int4 weights
  two to a byte, every other float tensor fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .bitpack import bits_for, pack_bits, unpack_bits
from .pq import PQCodebook
from .scalar import ScalarCodes, dequantize, quantize
from .schedule import LayerPlan, quantizable_weights
from .weight_swap import add_weight_fn, materialize_attention_weights

PQ_CHILD = "weight_pq"
SCALAR_CHILD = "weight_int"
PROVIDER_CHILDREN = (PQ_CHILD, SCALAR_CHILD)


def provider_of(module: nn.Module) -> Optional[nn.Module]:
    for child in PROVIDER_CHILDREN:
        if child in module._modules:
            return module._modules[child]
    return None


def is_fitted(provider: nn.Module) -> bool:
    return isinstance(provider, ScalarCodes) or bool(provider.fitted)


# --- attaching providers ---------------------------------------------------------------------


def _provider_weight_fn(provider: nn.Module):
    def weight(_stored: Optional[Tensor]) -> Optional[Tensor]:
        return provider() if getattr(provider, "_qn_fitted", True) else None

    return weight


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


def _unpack_provider_state(provider: nn.Module, state_dict, prefix, *args) -> None:
    """Turn the packed on-disk form back into the provider's buffers (see pack_state_dict)."""
    if prefix + "codes_packed" in state_dict:
        packed = state_dict.pop(prefix + "codes_packed")
        bits = bits_for(provider.n_centroids) if isinstance(provider, PQCodebook) else provider.bits
        codes = unpack_bits(packed, bits, provider.codes.numel())
        state_dict[prefix + "codes"] = codes.to(provider.codes.dtype).reshape(provider.codes.shape)
    if prefix + "centroids_codes" in state_dict:
        codes = state_dict.pop(prefix + "centroids_codes")
        scale = state_dict.pop(prefix + "centroids_scale")
        zero_point = state_dict.pop(prefix + "centroids_zero_point")
        state_dict[prefix + "centroids"] = dequantize(codes, scale, zero_point)
    if isinstance(provider, PQCodebook) and prefix + "fitted" not in state_dict:
        # A dense checkpoint (e.g. --restore-file of a trained model): the codebook is not fitted yet.
        for name, tensor in list(provider.named_parameters(recurse=False)) + list(provider.named_buffers(recurse=False)):
            state_dict[prefix + name] = tensor.detach()


def attach_provider(module: nn.Module, child: str, provider: nn.Module) -> None:
    module.add_module(child, provider)
    add_weight_fn(module, _provider_weight_fn(provider))
    module.register_state_dict_post_hook(_drop_dense_weight)
    module.register_load_state_dict_pre_hook(_fill_dense_weight)
    module.register_load_state_dict_post_hook(_sync_dense_weight)
    if not getattr(provider, "_qn_hooked", False):
        provider._qn_hooked = True
        provider.register_load_state_dict_pre_hook(_unpack_provider_state)
        provider.register_load_state_dict_post_hook(_refresh_fitted_flag)
        _refresh_fitted_flag(provider)


def free_dense_weight(module: nn.Module) -> None:
    """Inference: drop the dense Parameter of a compressed layer (the provider computes it)."""
    module._parameters["weight"] = None


def attach_pq_plan(model: nn.Module, plan: LayerPlan) -> PQCodebook:
    codebook = PQCodebook(plan.shape, plan.block_size, plan.n_centroids)
    for name in plan.names:
        attach_provider(model.get_submodule(name), PQ_CHILD, codebook)
    materialize_attention_weights(model)
    return codebook


@torch.no_grad()
def fit_pq(model: nn.Module, plan: LayerPlan, n_iter: int, seed: int, backend: str = "auto") -> float:
    """k-means the plan's weight into its codebook; every rank ends with rank 0's codebook."""
    module = model.get_submodule(plan.name)
    codebook = provider_of(module)
    objective = codebook.fit(module._parameters["weight"], n_iter=n_iter, seed=seed, backend=backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(codebook.centroids.data, src=0)
        torch.distributed.broadcast(codebook.codes, src=0)
    _refresh_fitted_flag(codebook)
    return objective


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
    if attached:
        materialize_attention_weights(model)
    return len({id(p) for p in attached.values()})


@torch.no_grad()
def scalar_quantize_remaining_(model: nn.Module, bits: int, free_dense: bool = True) -> List[str]:
    """int-``bits`` codes for every Linear/Embedding weight not compressed yet (per-row scales)."""
    done = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for names in quantizable_weights(model).values():
        if provider_of(modules[names[0]]) is not None:
            continue
        weight = modules[names[0]]._parameters["weight"]
        provider = ScalarCodes(weight.shape, bits, per_channel=True).fit(weight)
        for name in names:
            attach_provider(modules[name], SCALAR_CHILD, provider)
            if free_dense:
                free_dense_weight(modules[name])
        done.append(names[0])
    materialize_attention_weights(model)
    return done


# --- packed form and sizes -------------------------------------------------------------------

@dataclass
class SizeRow:
    name: str
    shape: tuple
    method: str  # pq / int8 / int4 / fp16 / fp32
    block_size: Optional[int]
    n_centroids: Optional[int]
    bits_per_weight: float
    bytes: float


def _provider_rows(name: str, provider: nn.Module, centroid_bits: Optional[int]) -> SizeRow:
    n = math.prod(provider.shape)
    if isinstance(provider, PQCodebook):
        code_bytes = math.ceil(provider.n_blocks * bits_for(provider.n_centroids) / 8)
        k, d = provider.centroids.shape
        centroid_bytes = math.ceil(k * d * centroid_bits / 8) + 8 if centroid_bits else k * d * 2
        total = code_bytes + centroid_bytes + 1  # + the fitted flag
        method = "pq" + (f"+int{centroid_bits}" if centroid_bits else "")
        return SizeRow(name, provider.shape, method, provider.block_size, provider.n_centroids, 8 * total / n, total)
    rows = provider.scale.numel()
    total = math.ceil(n * provider.bits / 8) + rows * 2 * 4 + 1  # codes, scale and zero point, n_bits
    return SizeRow(name, provider.shape, f"int{provider.bits}", None, None, 8 * total / n, total)


def _stored_parts(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, Tensor]]]:
    """What a compressed model stores, each once: (name, fitted provider) and (name, other tensor).

    Tied weights share one provider; a training model's stale dense copy of a quantized weight and
    unfitted codebooks (layers of later iPQ stages) are not part of the model.
    """
    providers, seen = [], set()
    for name, module in model.named_modules():
        provider = provider_of(module)
        if provider is None or not is_fitted(provider):
            continue
        if module._parameters.get("weight") is not None:
            seen.add(id(module._parameters["weight"]))
        if id(provider) not in seen:
            seen.add(id(provider))
            seen.update(id(t) for t in chain(provider.parameters(), provider.buffers()))
            providers.append((name, provider))
    tensors = []
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if id(tensor) in seen or not _is_persistent(model, name) or any(f".{c}." in f".{name}" for c in PROVIDER_CHILDREN):
            continue
        seen.add(id(tensor))
        tensors.append((name, tensor))
    return providers, tensors


def size_rows(model: nn.Module, float_bytes: int = 2, centroid_bits: Optional[int] = None) -> List[SizeRow]:
    """Every stored tensor of the model, grouped by layer, counted once even when tied."""
    providers, tensors = _stored_parts(model)
    rows = [_provider_rows(name, provider, centroid_bits) for name, provider in providers]
    for name, tensor in tensors:
        nbytes = tensor.numel() * (float_bytes if tensor.is_floating_point() else tensor.element_size())
        label = f"fp{8 * float_bytes}" if tensor.is_floating_point() else str(tensor.dtype).replace("torch.", "")
        rows.append(SizeRow(name, tuple(tensor.shape), label, None, None, 8 * nbytes / max(1, tensor.numel()), nbytes))
    return rows


def dense_fp32_bytes(model: nn.Module) -> int:
    """The uncompressed model at 4 bytes a weight (tied weights once, compressed layers at full size)."""
    providers, tensors = _stored_parts(model)
    return 4 * (sum(math.prod(p.shape) for _, p in providers) + sum(t.numel() for _, t in tensors if t.is_floating_point()))


def _is_persistent(model: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf not in owner._non_persistent_buffers_set


def storage_key(tensor: Tensor):
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)


@torch.no_grad()
def pack_state_dict(model: nn.Module, float_dtype: torch.dtype = torch.float16, centroid_bits: Optional[int] = None) -> Dict[str, Tensor]:
    """The model's state in the packed form; tensors shared by several keys (tied) stay shared."""
    providers = {}
    for name, module in model.named_modules(remove_duplicate=False):
        provider = provider_of(module)
        if provider is not None and is_fitted(provider):
            for child in PROVIDER_CHILDREN:
                if child in module._modules:
                    providers[f"{name}.{child}" if name else child] = provider
    memo: Dict[tuple, Dict[str, Tensor]] = {}
    packed: Dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        provider = providers.get(prefix)
        if provider is not None:
            memo_key = (id(provider), leaf)
            if memo_key not in memo:
                memo[memo_key] = _pack_provider_tensor(provider, leaf, tensor, float_dtype, centroid_bits)
            for suffix, value in memo[memo_key].items():
                packed[f"{prefix}.{suffix}"] = value
            continue
        memo_key = storage_key(tensor)
        if memo_key not in memo:
            memo[memo_key] = {"": tensor.to(float_dtype) if tensor.is_floating_point() else tensor}
        packed[key] = memo[memo_key][""]
    return packed


def container_overhead_bytes(state: Dict) -> int:
    """Bytes torch.save spends beside tensor data: the pickle (keys, cfg) and one zip entry per tensor.

    Measured exactly by saving a skeleton of ``state`` whose tensors are empty (shared ones stay
    shared), plus the worst-case 64-byte alignment padding of each non-empty tensor.
    """
    import io

    memo: Dict[tuple, Tensor] = {}

    def skeleton(value):
        if isinstance(value, Tensor):
            key = storage_key(value)
            if key not in memo:
                memo[key] = torch.empty(0, dtype=value.dtype)
            return memo[key]
        if isinstance(value, dict):
            return {k: skeleton(v) for k, v in value.items()}
        return value

    buffer = io.BytesIO()
    torch.save(skeleton(state), buffer)
    return buffer.getbuffer().nbytes + 32 * len(memo)  # on average half the 64-byte alignment


def _pack_provider_tensor(provider, leaf: str, tensor: Tensor, float_dtype, centroid_bits) -> Dict[str, Tensor]:
    if leaf == "codes":
        bits = bits_for(provider.n_centroids) if isinstance(provider, PQCodebook) else provider.bits
        if bits != 8:  # 8-bit codes are exactly a uint8 tensor; any other width is bit-packed
            return {"codes_packed": pack_bits(tensor, bits)}
        return {"codes": tensor}
    if leaf == "centroids" and centroid_bits:
        codes, scale, zero_point = quantize(tensor, centroid_bits, per_channel=False)
        return {"centroids_codes": codes, "centroids_scale": scale, "centroids_zero_point": zero_point}
    if leaf == "centroids":
        return {"centroids": tensor.to(float_dtype)}
    return {leaf: tensor}  # scale / zero_point / fitted stay as they are
