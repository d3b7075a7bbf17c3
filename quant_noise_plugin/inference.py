"""How a compressed layer computes: its weight from its provider, decoded once in inference
(decoded.py), and a Linear with int8 inputs on the CPU's int8 kernel or in float, chosen per layer on
the machine that runs it (int8_linear.py). ``prepare_inference`` makes those choices at load and says
in one log line what runs; ``compute_report`` lists them per layer (``quant-noise inspect``).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .decoded import decoded, low_memory, version_key
from . import int8_linear
from .int8_linear import Int8LinearWeight, is_symmetric
from .pq import PQCodebook
from .providers import INPUT_CHILD, is_fitted, provider_of
from .scalar import ScalarCodes

logger = logging.getLogger(__name__)
_INT8 = "_qn_int8_weight"


def provider_weight_fn(module: nn.Module, provider: nn.Module) -> Callable[[Optional[Tensor]], Optional[Tensor]]:
    """The layer's weight from its provider (weight_swap's weight fn); with an input quantizer, the int8 form."""

    def weight(_stored: Optional[Tensor]) -> Optional[Tensor]:
        if not getattr(provider, "_qn_fitted", True):
            return None
        if INPUT_CHILD in module._modules:
            return int8_linear_weight(module, provider)
        return decoded(provider)

    return weight


def _int8_codes(provider: nn.Module):
    """(symmetric int8 codes as uint8, scale, zero point) of the weight, when it has them exactly."""
    if isinstance(provider, ScalarCodes) and provider.bits == 8 and is_symmetric(provider.zero_point):
        return provider.codes, provider.scale, provider.zero_point
    if isinstance(provider, PQCodebook) and getattr(provider, "centroid_codes", None) is not None:
        centroid_codes, scale, zero_point = provider.centroid_codes
        if is_symmetric(zero_point):
            return centroid_codes[provider.codes.long()].reshape(provider.shape), scale, zero_point
    return None


def int8_linear_weight(module: nn.Module, provider: nn.Module) -> Int8LinearWeight:
    """The layer's int8 compute form (inference only), rebuilt only when its codes or input quantization change:
    oneDNN-packed symmetric int8 codes when its weight has them (int8 ScalarCodes, or PQ with int8 centroids
    gathered by the codes), else the float weight behind the same interface."""
    quantizer = module._modules[INPUT_CHILD]
    key = (version_key(provider), version_key(quantizer))
    cached = module.__dict__.get(_INT8)
    if cached is not None and cached[0] == key:
        return cached[1]
    scale, zero_point = quantizer.params
    codes = _int8_codes(provider)
    dequantize = lambda: decoded(provider)  # noqa: E731  (the float form, when it is needed: built once)
    if codes is not None:
        weight = Int8LinearWeight.from_codes(*codes, scale, zero_point, dequantize=dequantize)
    else:
        weight = Int8LinearWeight.reference_only(tuple(provider.shape), scale, zero_point, dequantize=dequantize)
    module.__dict__[_INT8] = (key, weight)
    return weight


def _int8_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if INPUT_CHILD in module._modules}


@torch.no_grad()
def prepare_inference(model: nn.Module, log: bool = True) -> Dict[str, Int8LinearWeight]:
    """Choose each int8-input Linear's compute now (kernel probe, speed per shape) and log one line saying what runs."""
    layers = {name: int8_linear_weight(module, provider_of(module)) for name, module in _int8_layers(model).items()}
    if layers and log:
        logger.log(*_summary(list(layers.values())))
    return layers


def _summary(weights: List[Int8LinearWeight]):
    """(level, message) of the load-time line: how many Linears run int8, at how many bits, what stays float and why."""
    support, n = int8_linear.kernel_support(), len(weights)
    on_kernel = [w for w in weights if w.compute == "int8"]
    floats = [w for w in weights if w.compute == "float"]
    if int8_linear.kernel_switch() == "0":
        return logging.INFO, f"int8 activations: {n} Linear layers on the fake-quant reference path (QUANT_NOISE_INT8_KERNELS=0)"
    if support.activation_bits is None:
        return (logging.WARNING, f"int8 activations: no int8 kernel on this machine ({support.reason}); "
                                 f"{len(floats)} of {n} Linear layers compute in float with their decoded int8/PQ weights")
    message = f"int8 activations: {len(on_kernel)} of {n} Linear layers on oneDNN int8 kernels"
    if on_kernel and on_kernel[0].input_bits != 8:
        message += f" with {on_kernel[0].input_bits}-bit activations: {support.reason}"
    if floats:
        message += f"; {len(floats)} in float compute (int8 measured slower for their shape on this CPU)"
    others = n - len(on_kernel) - len(floats)
    if others:
        message += f"; {others} on the fake-quant reference path (weights not symmetric int8)"
    return (logging.INFO if len(on_kernel) == n else logging.WARNING), message


def compute_report(model: nn.Module) -> List[dict]:
    """Per compressed layer: its weight form, input, and what computes it on this machine (and why)."""
    int8 = prepare_inference(model, log=False)  # loading said it already
    rows = []
    for name, module in model.named_modules():
        provider = provider_of(module)
        if provider is None:
            continue
        if isinstance(provider, PQCodebook):
            form = f"pq K={provider.n_centroids} bs={provider.block_size}"
        else:
            form = f"int{provider.bits}"
        if not is_fitted(provider):
            rows.append({"layer": name, "weight": "dense (its codebook not fitted yet)", "input": "float", "compute": "float",
                         "why": "a later stage of the iPQ schedule"})
        elif name in int8:
            weight = int8[name]
            compute = {"int8": f"oneDNN int8 (a{weight.input_bits})", "float": "float", "reference": "fake-quant reference"}[weight.compute]
            rows.append({"layer": name, "weight": form, "input": "int8", "compute": compute, "why": weight.why})
        else:
            how = "decoded at every forward (QUANT_NOISE_LOW_MEMORY=1)" if low_memory() else "decoded once, reused"
            rows.append({"layer": name, "weight": form, "input": "float", "compute": "float", "why": how})
    return rows
