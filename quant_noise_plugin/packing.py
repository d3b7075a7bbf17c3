"""The packed, inference-only form of a compressed model (``quant-noise pack``).

Each provider writes its own packed tensors (PQ codes bit-packed to ceil(log2 K) bits, centroids
fp16 or int8/int4; int4 weights two to a byte) and reads them back when loaded; every other float
tensor is stored fp16. Tensors shared by several keys (tied weights, one provider for several
layers) stay one tensor on disk.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .compressed import PROVIDER_CHILDREN, is_fitted, provider_of
from .sizes import storage_key


@torch.no_grad()
def pack_state_dict(model: nn.Module, float_dtype: torch.dtype = torch.float16, centroid_bits: Optional[int] = None) -> Dict[str, Tensor]:
    """The model's state in the packed form."""
    providers = {}
    for name, module in model.named_modules(remove_duplicate=False):
        provider = provider_of(module)
        if provider is not None and is_fitted(provider):
            for child in PROVIDER_CHILDREN:
                if child in module._modules:
                    providers[f"{name}.{child}" if name else child] = provider
    packed_by_provider: Dict[int, Dict[str, Tensor]] = {}
    shared: Dict[tuple, Tensor] = {}
    packed: Dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        provider = providers.get(prefix)
        if provider is not None:
            if id(provider) not in packed_by_provider:
                packed_by_provider[id(provider)] = provider.packed_state(float_dtype, centroid_bits)
            for suffix, value in packed_by_provider[id(provider)].items():
                packed[f"{prefix}.{suffix}"] = value
            continue
        memo = storage_key(tensor)
        if memo not in shared:
            shared[memo] = tensor.to(float_dtype) if tensor.is_floating_point() else tensor
        packed[key] = shared[memo]
    return packed
