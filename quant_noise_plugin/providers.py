"""What a compressed layer carries: the child that provides its weight, and its input quantizer.

A compressed layer keeps its ordinary module; a child ``weight_pq`` (PQCodebook) or ``weight_int``
(ScalarCodes) computes its weight, and a Linear with int8 inputs has an ``input_quant`` child
(ActivationQuantizer). Both the format (compressed.py) and the inference compute (inference.py)
find them through these names.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .scalar import ScalarCodes

PQ_CHILD = "weight_pq"
SCALAR_CHILD = "weight_int"
PROVIDER_CHILDREN = (PQ_CHILD, SCALAR_CHILD)
INPUT_CHILD = "input_quant"  # a Linear's int8 input quantization (ActivationQuantizer)


def provider_of(module: nn.Module) -> Optional[nn.Module]:
    for child in PROVIDER_CHILDREN:
        if child in module._modules:
            return module._modules[child]
    return None


def is_fitted(provider: nn.Module) -> bool:
    return isinstance(provider, ScalarCodes) or bool(provider.fitted)
