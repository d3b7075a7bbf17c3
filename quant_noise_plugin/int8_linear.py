"""int8 x int8 -> int32 Linear layers on the CPU, behind a weight that F.linear recognises. Plain torch.

``Int8LinearWeight`` is the weight a compressed Linear with int8 activations computes with
(weight_swap puts it in place of the layer's weight, as it does a PQ or int weight): a tensor
subclass holding the weight as symmetric int8 codes packed for oneDNN, and the layer's input
quantization (scale, zero point). ``F.linear(x, w, b)`` with it quantizes x to uint8 with the
stored parameters and runs ``torch.ops.onednn.qlinear_pointwise`` (torch's own x86 int8 GEMM, the
kernel torch.compile and torchao's x86 flow lower int8 Linears to): uint8 x int8 products summed
in int32, scaled back to fp32 with the bias added. Where that kernel does not apply (a CUDA input,
kernels switched off with ``QUANT_NOISE_INT8_KERNELS=0``, a CPU whose int8 products would
saturate) the same numbers are computed the slow way, ``F.linear(fake_quantize(x), dequantized
weight, b)``: the reference the kernel is tested against. Any other use of the tensor sees the
dequantized weight.

Why this kernel (measured here, README): it takes plain int8/uint8 tensors, where fbgemm's
``quantized::linear*`` ops need torch's quantized dtypes, deprecated since torch 2.13 (pytorch
issue 184982); it ran 2.6-6x fp32 on this CPU, fbgemm 1.8-6.9x; ``torch._int_mm`` is a reference
loop on the CPU (x0.04 fp32) and torchao's int8 CPU path goes through it. oneDNN needs symmetric
weights (zero point 0), so weights bound for it are quantized symmetrically.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from .activations import fake_quantize_activation

KERNEL_SWITCH = "QUANT_NOISE_INT8_KERNELS"  # "0": always the reference path
SIGNED_OFFSET = 128  # uint8 code c with zero point 128 is the signed int8 value c - 128


def quantize_input(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """uint8 codes of x (in place on one float buffer: it runs before every int8 Linear)."""
    q = x.float().mul(1.0 / scale)
    q.round_().add_(zero_point).clamp_(0, 255)
    return q.to(torch.uint8)


def _onednn_linear(q: Tensor, scale: float, zero_point: int, packed: Tensor, weight_scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    zeros = torch.zeros(weight_scales.numel(), dtype=torch.int32)
    return torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, packed, weight_scales, zeros, bias, 1.0, 0, torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def _kernel_works() -> bool:
    """oneDNN is in this torch build and int8 products at full range come out exact on this CPU.

    Without VNNI, x86 int8 kernels may sum pairs of uint8 x int8 products in int16, which saturates
    when both are near full range (torch's older x86 recipe quantized activations to 7 bits for
    that). The probe computes such a worst case and checks it exactly.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        k = 64
        packed = torch.ops.onednn.qlinear_prepack(torch.full((4, k), 127, dtype=torch.int8), None)
        out = _onednn_linear(torch.full((2, k), 255, dtype=torch.uint8), 1.0 / 255, 0, packed, torch.full((4,), 1.0 / 127), None)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return bool(torch.allclose(out, torch.full_like(out, float(k)), rtol=1e-4))


def int8_kernels_enabled() -> bool:
    return os.environ.get(KERNEL_SWITCH, "1") != "0" and _kernel_works()


def is_symmetric(zero_point: Tensor) -> bool:
    """Codes with zero point 128 everywhere are symmetric int8 weights (what oneDNN takes)."""
    return bool((zero_point.round() == SIGNED_OFFSET).all())


class Int8LinearWeight(Tensor):
    """A Linear weight as symmetric int8 codes with the layer's input quantization; see the module docstring."""

    @staticmethod
    def __new__(cls, codes: Optional[Tensor], scales: Optional[Tensor], input_scale: float, input_zero_point: int,
                dequantize: Callable[[], Tensor], shape=None):
        shape = codes.shape if codes is not None else shape
        return Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device="cpu", requires_grad=False)

    def __init__(self, codes: Optional[Tensor], scales: Optional[Tensor], input_scale: float, input_zero_point: int,
                 dequantize: Callable[[], Tensor], shape=None):
        """``codes``: int8 (out, in); ``scales``: per output row (or one); ``dequantize``: the float weight, for the reference.

        Without codes (a weight that is not symmetric int8), only the reference path exists.
        """
        self.packed = None if codes is None else torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)  # built once
        self.weight_scales = None if scales is None else scales.float().reshape(-1).expand(codes.shape[0]).contiguous()
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self._dequantize = dequantize

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero_point: Tensor, input_scale: float, input_zero_point: int,
                   dequantize: Callable[[], Tensor]) -> "Int8LinearWeight":
        """From symmetric uint8 codes (``weight = (codes - 128) * scale``), per tensor or per output row."""
        if not is_symmetric(zero_point):
            raise ValueError("oneDNN's int8 Linear needs symmetric weights (zero point 128 in uint8 codes)")
        return cls((codes.to(torch.int16) - SIGNED_OFFSET).to(torch.int8), scale, input_scale, input_zero_point, dequantize)

    @classmethod
    def reference_only(cls, shape, input_scale: float, input_zero_point: int, dequantize: Callable[[], Tensor]) -> "Int8LinearWeight":
        """int8 inputs over a weight that is not symmetric int8: the reference path only."""
        return cls(None, None, input_scale, input_zero_point, dequantize, shape=shape)

    @property
    def uses_kernel(self) -> bool:
        return self.packed is not None and int8_kernels_enabled()

    def dequantized(self) -> Tensor:
        return self._dequantize()

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if x.device.type == "cpu" and self.uses_kernel:
            q = quantize_input(x, self.input_scale, self.input_zero_point)
            out = _onednn_linear(q, self.input_scale, self.input_zero_point, self.packed, self.weight_scales,
                                 None if bias is None else bias.float())
            return out.to(x.dtype)
        return self.reference_linear(x, bias)

    def reference_linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """What the kernel computes, in float: the fake-quantized input times the dequantized weight."""
        weight = self.dequantized().to(x.device, torch.float32)
        quantized = fake_quantize_activation(x.float(), self.input_scale, self.input_zero_point)
        return F.linear(quantized, weight, None if bias is None else bias.float()).to(x.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls) and not isinstance(args[0], cls):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1].linear(args[0], bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(value):
            return value.dequantized() if isinstance(value, cls) else value

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))

    def __repr__(self) -> str:
        kind = "oneDNN int8" if self.packed is not None else "reference only"
        return f"Int8LinearWeight(shape={tuple(self.shape)}, {kind}, input_scale={self.input_scale:.4g}, input_zero_point={self.input_zero_point})"
