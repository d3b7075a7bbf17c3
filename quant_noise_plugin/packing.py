"""The packed, inference-only form of a compressed model (``quant-noise pack``).

Each provider writes its own packed tensors (PQ codes bit-packed to ceil(log2 K) bits, centroids
fp16 or int8/int4; int4 weights two to a byte) and reads them back when loaded, and so does each
activation quantizer (its fp32 scale and zero point); every other float tensor is stored fp16. Tensors shared by several keys (tied weights, one provider for several
layers) stay one tensor on disk.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .integrity import with_checksums
from .providers import PROVIDER_CHILDREN, is_fitted
from .sizes import dense_fp32_bytes, serialized_bytes, size_rows, storage_key


@torch.no_grad()
def pack_state_dict(model: nn.Module, float_dtype: torch.dtype = torch.float16, centroid_bits: Optional[int] = None,
                    symmetric: bool = False) -> Dict[str, Tensor]:
    """The model's state in the packed form (``symmetric``: int centroids as int8 kernels take them)."""
    self_packing = {}  # fitted providers and activation quantizers write their own packed tensors
    for name, module in model.named_modules(remove_duplicate=False):
        for child_name, child in module._modules.items():
            if child is None or not hasattr(child, "packed_state"):
                continue
            if child_name in PROVIDER_CHILDREN and not is_fitted(child):
                continue
            self_packing[f"{name}.{child_name}" if name else child_name] = child
    packed_by_module: Dict[int, Dict[str, Tensor]] = {}
    shared: Dict[tuple, Tensor] = {}
    packed: Dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        owner = self_packing.get(prefix)
        if owner is not None:
            if id(owner) not in packed_by_module:
                packed_by_module[id(owner)] = owner.packed_state(float_dtype, centroid_bits, symmetric)
            for suffix, value in packed_by_module[id(owner)].items():
                packed[f"{prefix}.{suffix}"] = value
            continue
        memo = storage_key(tensor)
        if memo not in shared:
            shared[memo] = tensor.to(float_dtype) if tensor.is_floating_point() else tensor
        packed[key] = shared[memo]
    return packed


def predicted_file(model: nn.Module, state: Dict, centroid_bits: Optional[int] = None) -> Dict:
    """The model's packed file without writing it: per-layer rows (sizes.SizeRow), the paper's byte count, and the
    file's bytes (the packed form with ``state``'s other entries and the checksums, serialized in memory)."""
    rows = size_rows(model, centroid_bits=centroid_bits)
    packed_form = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    packed_form["model"] = with_checksums(pack_state_dict(model, centroid_bits=centroid_bits))
    return {"rows": rows, "dense_fp32_bytes": dense_fp32_bytes(model), "compressed_bytes": sum(r.bytes for r in rows),
            "predicted_packed_file_bytes": serialized_bytes(packed_form)}
