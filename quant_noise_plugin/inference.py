"""How a compressed layer computes: its weight from its provider, decoded once in inference
(decoded.py) or, for a PQ weight, kept as codes that F.linear / F.embedding compute from (codes_weight.py,
``QUANT_NOISE_INFERENCE``), and a Linear with int8 inputs on the CPU's int8 kernel or in float, chosen per
layer on the machine that runs it (int8_linear.py). ``prepare_inference`` makes those choices at load and
says in log lines what runs and what the model holds; ``compute_report`` lists them per layer
(``quant-noise inspect``).
"""
from __future__ import annotations

import functools
import logging
from itertools import chain
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .codes_weight import INFERENCE_SWITCH, PQCodesWeight, inference_mode, measured_lut_rows
from .decoded import decoded, is_cached, low_memory, version_key
from . import int8_linear, lut
from .int8_linear import Int8LinearWeight, is_symmetric
from .pq import COMPACT_CODES, PQCodebook
from .providers import INPUT_CHILD, is_fitted, provider_of
from .scalar import ScalarCodes
from .weight_swap import PROJECTIONS, fuse_attention_again

logger = logging.getLogger(__name__)
_INT8 = "_qn_int8_weight"
_CODES = "_qn_codes_weight"
# auto does not try the tables below this many weights (4 MB in fp32): such a weight sits in the CPU's cache, where a
# dense matvec beats them (measured 0.1-0.3x on 128- to 512-wide layers), and trying would load numba for nothing
AUTO_MIN_WEIGHTS = 1 << 20


def provider_weight_fn(module: nn.Module, provider: nn.Module) -> Callable[[Optional[Tensor]], Optional[Tensor]]:
    """The layer's weight from its provider (weight_swap's weight fn); with an input quantizer, the int8 form;
    in inference, a PQ weight's codes where ``QUANT_NOISE_INFERENCE`` has them compute."""

    def weight(_stored: Optional[Tensor]) -> Optional[Tensor]:
        if not getattr(provider, "_qn_fitted", True):
            return None
        if INPUT_CHILD in module._modules:
            return int8_linear_weight(module, provider)
        if not provider.training and not torch.is_grad_enabled():
            codes = codes_weight(module, provider)
            if codes is not None:
                return codes
        return decoded(provider)

    return weight


def codes_weight(module: nn.Module, provider: nn.Module) -> Optional[PQCodesWeight]:
    """The PQ weight as codes for ``module`` (inference only), or None where it computes from a float weight:
    not PQ, ``QUANT_NOISE_INFERENCE=decoded``, or (auto) a Linear whose lookup tables never measured faster.
    Built once per change of the codebook's tensors, shared by tied layers."""
    mode = inference_mode()
    if mode == "decoded" or not isinstance(provider, PQCodebook) or len(provider.shape) != 2:
        return None
    embedding = isinstance(module, nn.Embedding)
    if mode == "auto" and not embedding and provider.n_blocks * provider.block_size < AUTO_MIN_WEIGHTS:
        return None  # too small for the tables to pay: decided before anything is built or measured
    if not is_fitted(provider) or (mode == "auto" and embedding and is_cached(provider)):
        return None  # auto: a tied embedding whose output projection decoded the weight anyway looks rows up in it
    if mode == "codes":
        provider.compact()  # codes under 8 bits stay bit-packed, as on disk
    key = (version_key(provider), mode, low_memory())
    cached = provider.__dict__.get(_CODES)
    if cached is None or cached[0] != key:
        out_features, in_features = provider.shape
        against = "decode" if mode == "codes" else "decoded"
        rows = functools.partial(measured_lut_rows, out_features, in_features, provider.block_size, provider.n_centroids, against,
                                 provider.compacted)
        centroids = provider.centroids.detach()
        codes = (lut.BitCodes(provider._buffers[COMPACT_CODES], provider.code_bits, (out_features, in_features // provider.block_size))
                 if provider.compacted else provider.codes.view(out_features, -1))
        if mode == "codes":
            float_weight = lambda: lut.decode(centroids, codes)  # noqa: E731  (for this call only)
            why = "codes only: the float weight is decoded for a call of more rows, then dropped"
        else:
            float_weight = lambda: decoded(provider)  # noqa: E731  (built on first need, kept: as in decoded mode)
            why = "larger calls use the weight decoded once"
        weight = PQCodesWeight(centroids, codes, provider.shape, rows, float_weight, why)
        provider.__dict__[_CODES] = cached = (key, weight)
    weight = cached[1]
    if mode == "auto" and not embedding and weight.lut_rows == 0:
        return None  # the tables never win for this Linear: the decoded weight, with no dispatch in between
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


def _codes_layers(model: nn.Module) -> Dict[str, Optional[PQCodesWeight]]:
    """Every fitted PQ layer with a float input: its codes weight (None: it computes from the decoded weight)."""
    layers = {}
    for name, module in model.named_modules():
        provider = provider_of(module)
        if isinstance(provider, PQCodebook) and is_fitted(provider) and INPUT_CHILD not in module._modules:
            layers[name] = codes_weight(module, provider)
    return layers


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers, codes and centroids, plain tensor attributes (fairseq's
    sinusoidal position table) and the inference caches (decoded weights, int8 packed weights); each storage once (tied
    layers share theirs)."""
    seen, total = set(), 0

    def add(tensor) -> None:
        nonlocal total
        if not isinstance(tensor, Tensor) or isinstance(tensor, PQCodesWeight):
            return  # a codes weight holds the codebook's own tensors, counted with it
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # an opaque (e.g. oneDNN-packed) tensor
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in seen:
            seen.add(key)
            total += size

    for module in model.modules():
        for tensor in chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            add(tensor)
        for value in module.__dict__.values():
            add(value)  # plain tensor attributes, e.g. fairseq's sinusoidal position table
            if isinstance(value, tuple) and len(value) == 2:  # (key, cached) inference caches
                add(value[1])
                if isinstance(value[1], Int8LinearWeight):
                    add(value[1].packed)
                    add(value[1].weight_scales)
    return total


@torch.no_grad()
def prepare_inference(model: nn.Module, log: bool = True) -> Dict[str, Int8LinearWeight]:
    """Choose each compressed layer's compute now (kernel probe, speed per shape) and log what runs:
    int8-input Linears (int8 kernel or float), PQ layers (from their codes or decoded), and the model's bytes."""
    layers = {name: int8_linear_weight(module, provider_of(module)) for name, module in _int8_layers(model).items()}
    fused = _fuse_float_attention(model, layers)
    if layers and log:
        level, message = _summary(list(layers.values()))
        logger.log(level, message + (f"; {fused} attention modules back on the fused path (their projections all compute in float)"
                                     if fused else ""))
    codes = _codes_layers(model)
    if codes and log:
        logger.info(_codes_summary(model, codes))
    return layers


def _fuse_float_attention(model: nn.Module, int8: Dict[str, Int8LinearWeight]) -> int:
    """Attention routed through its projections for their int8 inputs, whose projections all measured faster in float:
    fairseq's fused path again (the unfused one costs small models up to 10%). Returns how many were fused."""
    fused = 0
    for name, module in model.named_modules():
        projections = [f"{name}.{p}".lstrip(".") for p in PROJECTIONS]
        if all(p in int8 and int8[p].compute == "float" for p in projections) and fuse_attention_again(module):
            fused += 1
    return fused


def _codes_summary(model: nn.Module, codes: Dict[str, Optional[PQCodesWeight]]) -> str:
    modules = dict(model.named_modules())
    linears = {n: w for n, w in codes.items() if not isinstance(modules[n], nn.Embedding)}
    tables = [w for w in linears.values() if w is not None and w.lut_rows > 0]
    embeddings = sum(isinstance(modules[n], nn.Embedding) and w is not None for n, w in codes.items())
    mode = inference_mode()
    message = f"PQ layers ({INFERENCE_SWITCH}={mode}): {len(tables)} of {len(linears)} Linear layers run lookup tables from their codes"
    if tables:
        kernel = "numba" if lut.numba_enabled() else "plain torch: numba missing or off"
        low, high = min(w.lut_rows for w in tables), max(w.lut_rows for w in tables)
        message += f" ({kernel}) for calls of up to {low if low == high else f'{low}-{high}'} rows"
    if mode == "codes":
        message += "; no float weight is kept (larger calls decode theirs for the call)"
    elif mode == "auto":
        message += "; the others, and larger calls, use the weight decoded once"
    if embeddings:
        message += f"; {embeddings} Embedding(s) decode only the rows they look up"
    return message + f"; model tensors {held_tensor_bytes(model) / 1e6:.2f} MB now"


def _summary(weights: List[Int8LinearWeight]):
    """(level, message) of the load-time line: how many Linears run int8, at how many bits, what stays float and why."""
    support, n = int8_linear.kernel_support(), len(weights)
    on_kernel = [w for w in weights if w.compute == "int8"]
    floats = [w for w in weights if w.compute == "float"]
    if int8_linear.kernel_switch() == "0":
        message = f"int8 activations: {n} Linear layers on the fake-quant reference path (QUANT_NOISE_INT8_KERNELS=0)"
        reduced = [w for w in weights if w.input_bits != 8]
        if reduced:
            message += f", {len(reduced)} with {reduced[0].input_bits}-bit activations as this CPU's kernel: {support.reason}"
        return logging.INFO, message
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
            codes = codes_weight(module, provider)
            if isinstance(module, nn.Embedding) and codes is not None:
                compute, how = "rows from codes", "only the rows looked up are decoded"
            elif codes is not None and codes.lut_rows > 0:
                compute, how = f"tables <= {codes.lut_rows} rows", f"lookup tables measured faster up to {codes.lut_rows} rows; {codes.why}"
            elif codes is not None:
                compute, how = "float (decoded per call)", codes.why
            else:
                compute = "float"
                how = "decoded at every forward (QUANT_NOISE_LOW_MEMORY=1)" if low_memory() else "decoded once, reused"
                if isinstance(provider, PQCodebook) and inference_mode() == "auto":
                    small = provider.n_blocks * provider.block_size < AUTO_MIN_WEIGHTS
                    how += ("; too small for lookup tables to pay (auto tries them from 2^20 weights)" if small
                            else "; its lookup tables measured slower at every row count")
            rows.append({"layer": name, "weight": form, "input": "float", "compute": compute, "why": how})
    return rows
