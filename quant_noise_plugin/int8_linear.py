"""int8 x int8 -> int32 Linear layers on the CPU, behind a weight that F.linear recognises. Plain torch.

``Int8LinearWeight`` is the weight a compressed Linear with int8 activations computes with
(weight_swap puts it in place of the layer's weight, as it does a PQ or int weight): a tensor
subclass holding the weight as symmetric int8 codes packed for oneDNN, and the layer's input
quantization (scale, zero point). ``F.linear(x, w, b)`` with it quantizes x to uint8 with the
stored parameters and runs ``torch.ops.onednn.qlinear_pointwise`` (torch's own x86 int8 GEMM, the
kernel torch.compile and torchao's x86 flow lower int8 Linears to): uint8 x int8 products summed
in int32, scaled back to fp32 with the bias added.

Each layer's compute is chosen once, on the machine that runs it (``choose_compute``): the kernel
where it is exact (probed: with VNNI at 8-bit activations; without VNNI at 7 bits, "reduce range",
over the same calibrated range) and measured faster than float for the layer's shape; else float,
the decoded weight on the float input (no int8 kernel on this CPU, or a shape too small to gain);
``QUANT_NOISE_INT8_KERNELS=0`` asks for the fake-quant reference everywhere,
``F.linear(fake_quantize(x), dequantized weight, b)``: the numbers the kernel is tested against
(also what a CUDA input gets), at the activation bits the kernel takes on this CPU (7 without VNNI:
``activation_bits_here``). Any other use of the tensor sees the dequantized weight.

Why this kernel (measured here, README): it takes plain int8/uint8 tensors, where fbgemm's
``quantized::linear*`` ops need torch's quantized dtypes, deprecated since torch 2.13 (pytorch
issue 184982); it ran 2.6-6x fp32 on this CPU, fbgemm 1.8-6.9x; ``torch._int_mm`` is a reference
loop on the CPU (x0.04 fp32) and torchao's int8 CPU path goes through it. oneDNN needs symmetric
weights (zero point 0), so weights bound for it are quantized symmetrically.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import affine_qparams, fake_quantize_activation
from .weight_swap import ComputedWeight

logger = logging.getLogger(__name__)

KERNEL_SWITCH = "QUANT_NOISE_INT8_KERNELS"  # see kernel_switch()
SIGNED_OFFSET = 128  # uint8 code c with zero point 128 is the signed int8 value c - 128
REDUCED_ACTIVATION_BITS = 7  # reduce range: uint8 codes in [0, 127]
# oneDNN's, MKL's, ATen's and numba's own switches that make this CPU compute as an AVX2-only one (no AVX-512, no
# VNNI): the int8 probe then fails at 8 bits, as on a real one. The benchmarks and `make test`'s second pass use it.
AVX2_WITHOUT_VNNI = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                     "NUMBA_CPU_NAME": "haswell"}
MIN_SPEEDUP = 1.1  # int8 compute must beat float by this much on a layer's shape to be chosen (timer noise)
SPEED_TOKENS = 256  # rows of the micro-benchmark's input: an eval batch's share of one layer call


def kernel_switch() -> str:
    """``QUANT_NOISE_INT8_KERNELS``: "auto" (default: the int8 kernel where it measures faster than float),
    "1" (wherever it runs, no speed test) or "0" (the fake-quant reference everywhere: the exact numbers
    of the stored int8 model, for checking)."""
    value = os.environ.get(KERNEL_SWITCH, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{KERNEL_SWITCH}={value!r}: use auto, 1 or 0")
    return value


class _LastInput(threading.local):
    """The last input quantized (q, k and v projections quantize the same tensor with the same parameters)
    and one float scratch buffer reused across layers: a fresh multi-MB tensor per call costs page faults."""

    def __init__(self) -> None:
        self.x, self.version, self.params, self.codes = None, None, None, None
        self.scratch = torch.empty(0)


_last = _LastInput()


def quantize_input(x: Tensor, scale: float, zero_point: int, qmax: int = 255) -> Tensor:
    """uint8 codes of x: round(x / scale) + zero_point, clamped to [0, qmax]."""
    params = (float(scale), int(zero_point), int(qmax), tuple(x.shape))
    try:
        version = x._version
    except RuntimeError:  # an inference-mode tensor has no version counter: nothing is reused
        version = None
    if version is not None and _last.x is x and _last.version == version and _last.params == params:
        return _last.codes
    if _last.scratch.numel() < x.numel():
        _last.scratch = torch.empty(x.numel())
    q = torch.mul(x, 1.0 / scale, out=_last.scratch[: x.numel()].view(x.shape))
    q.round_().add_(zero_point).clamp_(0, qmax)
    codes = q.to(torch.uint8)
    _last.x, _last.version, _last.params, _last.codes = (x, version, params, codes) if version is not None else (None,) * 4
    return codes


def _onednn_linear(q: Tensor, scale: float, zero_point: int, packed: Tensor, weight_scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    zeros = torch.zeros(weight_scales.numel(), dtype=torch.int32)
    return torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, packed, weight_scales, zeros, bias, 1.0, 0, torch.float32, "none", [], "")


def _exact_at(activation_max: int) -> bool:
    """uint8 inputs all ``activation_max`` times int8 weights all 127: is the sum exact on this CPU?"""
    try:
        k = 64
        packed = torch.ops.onednn.qlinear_prepack(torch.full((4, k), 127, dtype=torch.int8), None)
        out = _onednn_linear(torch.full((2, k), activation_max, dtype=torch.uint8), 1.0 / activation_max, 0, packed,
                             torch.full((4,), 1.0 / 127), None)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return bool(torch.allclose(out, torch.full_like(out, float(k)), rtol=1e-4))


@dataclass(frozen=True)
class KernelSupport:
    """What this CPU's int8 kernel can do: the activation bits it is exact with (None: no kernel), and why."""

    activation_bits: Optional[int]
    reason: str


@functools.lru_cache(maxsize=None)
def kernel_support() -> KernelSupport:
    """Probed once per process.

    With VNNI, x86 int8 kernels sum uint8 x int8 products in int32. Without it (AVX2 only: many AMD
    Zen and pre-2019 Intel CPUs) they sum pairs of products in int16 first, which saturates when both
    are near full range; with activations on 7 bits (torch's x86 "reduce range" recipe) a pair sum
    stays below 2**15 and the kernel is exact again. The probe computes the worst case at 8 and at 7 bits.
    """
    if not torch.backends.mkldnn.is_available():
        return KernelSupport(None, "this torch build has no oneDNN")
    if _exact_at(255):
        return KernelSupport(8, "int8 products exact at full range (VNNI)")
    if _exact_at(2**REDUCED_ACTIVATION_BITS - 1):
        return KernelSupport(REDUCED_ACTIVATION_BITS, "this CPU lacks VNNI: 8-bit activations would saturate the kernel's "
                                                      "int16 pair sums, 7 bits are exact (reduce range)")
    return KernelSupport(None, "int8 products saturate on this CPU even with 7-bit activations")


def _kernel_works() -> bool:
    return kernel_support().activation_bits is not None


def int8_kernels_enabled() -> bool:
    return kernel_switch() != "0" and _kernel_works()


def activation_bits_here(has_int8_codes: bool) -> int:
    """The bits a layer's inputs are quantized to on this CPU, by the kernel and by its reference alike: the kernel's
    exact width where it could run the layer (7 without VNNI), so ``QUANT_NOISE_INT8_KERNELS=0`` checks the
    numbers the kernel computes here; 8, the stored model's, where no kernel could (no kernel, weights not
    symmetric int8)."""
    bits = kernel_support().activation_bits if has_int8_codes else None
    return bits or 8


def reduced_range(scale: float, zero_point: int, bits: int) -> Tuple[float, int]:
    """The same calibrated range [lo, hi] on ``bits``-bit codes (a coarser step, nothing more clipped)."""
    lo, hi = -zero_point * scale, (255 - zero_point) * scale
    return affine_qparams(lo, hi, bits=bits)


def best_time(fn: Callable[[], object], repeat: int = 5, calls: int = 4) -> float:
    """The fastest of ``repeat`` timings of ``calls`` calls: a shared machine's noise only ever adds time."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def int8_speedup(out_features: int, in_features: int, activation_bits: int = 8) -> float:
    """Measured once per shape and process: float F.linear time / int8 time (input quantization included),
    on ``SPEED_TOKENS`` rows of random input; the two interleaved, best of several runs each."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SPEED_TOKENS, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    codes = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(codes, None)
    scales = torch.full((out_features,), 0.05 / 127)
    scale, zero_point, qmax = 8.0 / 255, 128, 2**activation_bits - 1

    def run_float():
        F.linear(x, weight)

    def run_int8():
        _onednn_linear(quantize_input(x, scale, zero_point, qmax), scale, zero_point, packed, scales, None)

    with torch.no_grad():
        for fn in (run_float, run_int8, run_float, run_int8):  # warm up both
            fn()
        times = {run_float: float("inf"), run_int8: float("inf")}
        for _ in range(3):
            for fn in times:
                times[fn] = min(times[fn], best_time(fn))
    return times[run_float] / times[run_int8]


@functools.lru_cache(maxsize=None)
def _warn_cuda_once() -> None:
    logger.warning("int8 kernels are CPU-only: int8 Linears on CUDA inputs compute on the fake-quant reference path")


def is_symmetric(zero_point: Tensor) -> bool:
    """Codes with zero point 128 everywhere are symmetric int8 weights (what oneDNN takes)."""
    return bool((zero_point.round() == SIGNED_OFFSET).all())


def choose_compute(out_features: int, in_features: int, has_int8_codes: bool) -> Tuple[str, str]:
    """How an int8-input Linear of this shape computes on this machine, and why: "int8" (the kernel),
    "float" (its decoded weight on its float input: no int8 kernel here, or the kernel measured slower
    for this shape) or "reference" (fake-quantized input times the dequantized weight)."""
    switch = kernel_switch()
    if switch == "0":
        return "reference", f"{KERNEL_SWITCH}=0"
    if not has_int8_codes:
        return "reference", "its weight is not symmetric int8 codes"
    support = kernel_support()
    if support.activation_bits is None:
        return "float", support.reason
    if switch == "1":
        return "int8", f"{KERNEL_SWITCH}=1"
    speedup = int8_speedup(out_features, in_features, support.activation_bits)
    if speedup >= MIN_SPEEDUP:
        return "int8", f"measured x{speedup:.2f} float speed for this shape"
    return "float", f"int8 measured x{speedup:.2f} float speed for this shape (below x{MIN_SPEEDUP})"


class Int8LinearWeight(ComputedWeight):
    """A Linear weight as symmetric int8 codes with the layer's input quantization; see the module docstring."""

    @staticmethod
    def __new__(cls, codes: Optional[Tensor], scales: Optional[Tensor], input_scale: float, input_zero_point: int,
                dequantize: Callable[[], Tensor], shape=None, compute: Optional[str] = None):
        shape = codes.shape if codes is not None else shape
        return Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device="cpu", requires_grad=False)

    def __init__(self, codes: Optional[Tensor], scales: Optional[Tensor], input_scale: float, input_zero_point: int,
                 dequantize: Callable[[], Tensor], shape=None, compute: Optional[str] = None):
        """``codes``: int8 (out, in); ``scales``: per output row (or one); ``dequantize``: the float weight;
        (``input_scale``, ``input_zero_point``): the stored 8-bit input quantization; ``compute``: "int8",
        "float" or "reference", by default ``choose_compute`` for this shape on this machine.

        Without codes (a weight that is not symmetric int8), only the reference path exists. On a CPU
        that needs reduce range, the int8 path and its reference quantize inputs over the same range on 7 bits.
        """
        out_features, in_features = self.shape
        if compute is None:
            compute, self.why = choose_compute(out_features, in_features, codes is not None)
        else:
            self.why = "chosen by the caller"
        if compute == "int8" and (codes is None or not _kernel_works()):
            raise ValueError("int8 compute needs symmetric int8 codes and a working int8 kernel")
        self.compute = compute
        self.input_bits = activation_bits_here(codes is not None)
        if self.input_bits != 8:
            input_scale, input_zero_point = reduced_range(input_scale, input_zero_point, self.input_bits)
        self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None) if compute == "int8" else None  # built once
        self.weight_scales = None if scales is None else scales.float().reshape(-1).expand(out_features).contiguous()
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self._dequantize = dequantize

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero_point: Tensor, input_scale: float, input_zero_point: int,
                   dequantize: Callable[[], Tensor], compute: Optional[str] = None) -> "Int8LinearWeight":
        """From symmetric uint8 codes (``weight = (codes - 128) * scale``), per tensor or per output row."""
        if not is_symmetric(zero_point):
            raise ValueError("oneDNN's int8 Linear needs symmetric weights (zero point 128 in uint8 codes)")
        return cls((codes.to(torch.int16) - SIGNED_OFFSET).to(torch.int8), scale, input_scale, input_zero_point, dequantize,
                   compute=compute)

    @classmethod
    def reference_only(cls, shape, input_scale: float, input_zero_point: int, dequantize: Callable[[], Tensor]) -> "Int8LinearWeight":
        """int8 inputs over a weight that is not symmetric int8: the reference path only."""
        return cls(None, None, input_scale, input_zero_point, dequantize, shape=shape, compute="reference")

    @property
    def uses_kernel(self) -> bool:
        return self.compute == "int8"

    def dequantized(self) -> Tensor:
        return self._dequantize()

    float_value = dequantized  # what any use other than F.linear sees (ComputedWeight)

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if self.compute == "float":
            return F.linear(x, self.dequantized().to(x.device, x.dtype), bias)
        if self.compute == "int8" and x.device.type == "cpu":
            q = quantize_input(x, self.input_scale, self.input_zero_point, 2**self.input_bits - 1)
            out = _onednn_linear(q, self.input_scale, self.input_zero_point, self.packed, self.weight_scales,
                                 None if bias is None else bias.float())
            return out.to(x.dtype)
        if self.compute == "int8":
            _warn_cuda_once()
        return self.reference_linear(x, bias)

    def reference_linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """What the kernel computes, in float: the fake-quantized input times the dequantized weight."""
        weight = self.dequantized().to(x.device, torch.float32)
        quantized = fake_quantize_activation(x.float(), self.input_scale, self.input_zero_point, self.input_bits)
        return F.linear(quantized, weight, None if bias is None else bias.float()).to(x.dtype)

    def __repr__(self) -> str:
        return (f"Int8LinearWeight(shape={tuple(self.shape)}, compute={self.compute}, input_bits={self.input_bits}, "
                f"input_scale={self.input_scale:.4g}, input_zero_point={self.input_zero_point})")
