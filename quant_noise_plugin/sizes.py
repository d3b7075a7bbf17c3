"""Size accounting, as the paper counts it: what each stored tensor of a compressed model costs.

A PQ layer costs its codes at ceil(log2 K) bits per block plus its centroids (fp16, or int8/int4
with one scale); an int layer its codes plus per-row scales; everything else fp16. Tied weights and
shared providers are counted once; a training model's stale dense copies and unfitted codebooks
(layers of later iPQ stages) are not part of the model.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from itertools import chain
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .bitpack import bits_for
from .activations import ActivationQuantizer
from .providers import INPUT_CHILD, PROVIDER_CHILDREN, is_fitted, provider_of
from .pq import PQCodebook


@dataclass
class SizeRow:
    name: str
    shape: tuple
    method: str  # pq / int8 / int4 / fp16 / fp32
    block_size: Optional[int]
    n_centroids: Optional[int]
    bits_per_weight: float
    bytes: float


def pq_bytes(shape, block_size: int, n_centroids: int, centroid_bits: Optional[int] = None) -> int:
    """A PQ weight as stored: its codes at ceil(log2 K) bits per block, its centroids (fp16, or int codes with one
    fp32 scale and zero point) and its fitted flag. Int centroids are stored a code a byte, int4 ones too (packing
    those would save K * block_size / 2 bytes a layer, 1 KB at K=256 and blocks of 8)."""
    code_bytes = math.ceil(math.prod(shape) // block_size * bits_for(n_centroids) / 8)
    centroid_bytes = n_centroids * block_size + 8 if centroid_bits else n_centroids * block_size * 2
    return code_bytes + centroid_bytes + 1


def scalar_bytes(shape, bits: int, n_scales: int) -> int:
    """An int weight as stored: its codes, a scale and zero point (4 bytes each) per row or tensor, its bit count."""
    return math.ceil(math.prod(shape) * bits / 8) + n_scales * 2 * 4 + 1


def _provider_rows(name: str, provider: nn.Module, centroid_bits: Optional[int]) -> SizeRow:
    n = math.prod(provider.shape)
    if isinstance(provider, PQCodebook):
        total = pq_bytes(provider.shape, provider.block_size, provider.n_centroids, centroid_bits)
        method = "pq" + (f"+int{centroid_bits}" if centroid_bits else "")
        return SizeRow(name, provider.shape, method, provider.block_size, provider.n_centroids, 8 * total / n, total)
    total = scalar_bytes(provider.shape, provider.bits, provider.scale.numel())
    return SizeRow(name, provider.shape, f"int{provider.bits}", None, None, 8 * total / n, total)


def stored_parts(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, Tensor]]]:
    """What a compressed model stores, each once: (name, fitted provider) and (name, other tensor)."""
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
        if id(tensor) in seen or not _is_persistent(model, name) or any(f".{c}." in f".{name}" for c in (*PROVIDER_CHILDREN, INPUT_CHILD)):
            continue
        seen.add(id(tensor))
        tensors.append((name, tensor))
    return providers, tensors


def activation_quantizers(model: nn.Module) -> List[Tuple[str, ActivationQuantizer]]:
    """(layer name, its input quantizer), in model order."""
    return [(name, module._modules[INPUT_CHILD]) for name, module in model.named_modules() if INPUT_CHILD in module._modules]


def size_rows(model: nn.Module, float_bytes: int = 2, centroid_bits: Optional[int] = None) -> List[SizeRow]:
    """Every stored tensor of the model, grouped by layer, counted once even when tied."""
    providers, tensors = stored_parts(model)
    rows = [_provider_rows(name, provider, centroid_bits) for name, provider in providers]
    for name, quantizer in activation_quantizers(model):  # fp32 scale, int32 zero point, uint8 bits
        rows.append(SizeRow(f"{name}.{INPUT_CHILD}", (), f"act-int{int(quantizer.n_bits)}", None, None, 0.0, 9))
    for name, tensor in tensors:
        nbytes = tensor.numel() * (float_bytes if tensor.is_floating_point() else tensor.element_size())
        label = f"fp{8 * float_bytes}" if tensor.is_floating_point() else str(tensor.dtype).replace("torch.", "")
        rows.append(SizeRow(name, tuple(tensor.shape), label, None, None, 8 * nbytes / max(1, tensor.numel()), nbytes))
    return rows


def dense_fp32_bytes(model: nn.Module) -> int:
    """The uncompressed model at 4 bytes a weight (tied weights once, compressed layers at full size)."""
    providers, tensors = stored_parts(model)
    return 4 * (sum(math.prod(p.shape) for _, p in providers) + sum(t.numel() for _, t in tensors if t.is_floating_point()))


def _is_persistent(model: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf not in owner._non_persistent_buffers_set


def storage_key(tensor: Tensor):
    """Tensors that share this key are one tensor on disk (torch.save stores shared storage once)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)


def serialized_bytes(state: Dict) -> int:
    """The bytes torch.save writes for ``state``, counted by saving it to memory: what a checkpoint written through an
    open file (checkpoints.write_checkpoint_atomically) takes on disk, whatever the file's name."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes
