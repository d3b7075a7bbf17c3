"""Affine int4/int8 scalar quantization of weights: plain torch, no fairseq.

Codes are unsigned integers in [0, 2**bits - 1]; ``weight ~= (codes - zero_point) * scale``.
Per-channel statistics are taken over each output row (dim 0), per-tensor over the whole weight.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from .bitpack import pack_bits, unpack_bits
from .errors import QuantNoiseError

SUPPORTED_BITS = (2, 3, 4, 8)  # 2 and 3: the severe end of the scalar baselines (codes bit-packed on disk)


def check_bits(bits: int, flag: str = "bits") -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantNoiseError(f"{flag}={bits}: only {SUPPORTED_BITS} bits are supported")


def affine_params(weight: Tensor, bits: int, per_channel: bool = False, symmetric: bool = False) -> Tuple[Tensor, Tensor]:
    """Min-max observer: (scale, zero_point), shaped to broadcast against ``weight``.

    Symmetric: zero point 2**(bits-1) and scale max|w| / (2**(bits-1) - 1), i.e. signed codes in
    [-(2**(bits-1) - 1), 2**(bits-1) - 1] stored with an offset; what int8 GEMM kernels take as weights.
    """
    check_bits(bits)
    qmax = 2**bits - 1
    w = weight.detach().float()
    if per_channel:
        lo, hi = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
        view = (-1,) + (1,) * (w.dim() - 1)
    else:
        lo, hi = torch.aminmax(w)
        view = (1,) * w.dim()
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.clamp(torch.maximum(-lo, hi) / (half - 1), min=1e-8)
        return scale.reshape(view), torch.full_like(scale, float(half)).reshape(view)
    lo = torch.clamp(lo, max=0.0)  # keep 0 exactly representable
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale.reshape(view), zero_point.reshape(view)


def quantize(weight: Tensor, bits: int, per_channel: bool = False, symmetric: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer codes (uint8) and their (scale, zero_point)."""
    scale, zero_point = affine_params(weight, bits, per_channel, symmetric)
    codes = torch.clamp(torch.round(weight.detach().float() / scale) + zero_point, 0, 2**bits - 1)
    return codes.to(torch.uint8), scale, zero_point


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (codes.float() - zero_point) * scale


def fake_quantize(weight: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """Quantize then dequantize, in ``weight``'s dtype (no gradient: callers add the STE).

    The same arithmetic as ``dequantize(*quantize(...))``, done in place on one buffer: it runs
    every training forward under scalar Quant-Noise.
    """
    scale, zero_point = affine_params(weight, bits, per_channel)
    out = weight.detach().float() / scale
    out.round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)
    return out.to(weight.dtype)


class ScalarCodes(torch.nn.Module):
    """A weight stored as int-``bits`` codes with per-row (or per-tensor) scale and zero point.

    ``forward()`` returns the dequantized weight; codes are kept unpacked (uint8) in memory and
    bit-packed only on disk (``packed_state``).
    """

    def __init__(self, shape, bits: int, per_channel: bool = True, symmetric: bool = False):
        super().__init__()
        check_bits(bits)
        self.shape = tuple(int(s) for s in shape)
        self.bits = int(bits)
        self.per_channel = bool(per_channel)
        self.symmetric = bool(symmetric)  # how ``fit`` chooses its parameters; the stored form is the same
        rows = self.shape[0] if per_channel else 1
        view = (rows,) + (1,) * (len(self.shape) - 1)
        self.register_buffer("codes", torch.zeros(self.shape, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(view))
        self.register_buffer("zero_point", torch.zeros(view))
        self.register_buffer("n_bits", torch.tensor(self.bits, dtype=torch.uint8))  # so a loader knows

    @torch.no_grad()
    def fit(self, weight: Tensor) -> "ScalarCodes":
        codes, scale, zero_point = quantize(weight, self.bits, self.per_channel, self.symmetric)
        self.codes.copy_(codes.reshape(self.shape))
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        return self

    @torch.no_grad()
    def set_codes(self, codes: Tensor, scale: Tensor, zero_point: Tensor) -> "ScalarCodes":
        """Codes chosen elsewhere (error feedback, gptq.py) on this quantizer's grid."""
        self.codes.copy_(codes.reshape(self.shape))
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        return self

    def forward(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)

    def packed_state(self, float_dtype: torch.dtype = torch.float16, centroid_bits=None, symmetric: bool = False) -> Dict[str, Tensor]:
        """The on-disk form: 8-bit codes as they are, narrower codes bit-packed (two 4-bit codes a byte); scales as they are."""
        state = {"scale": self.scale, "zero_point": self.zero_point, "n_bits": self.n_bits}
        state.update({"codes": self.codes} if self.bits == 8 else {"codes_packed": pack_bits(self.codes, self.bits)})
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "codes_packed" in state_dict:
            packed = state_dict.pop(prefix + "codes_packed")
            state_dict[prefix + "codes"] = unpack_bits(packed, self.bits, self.codes.numel()).to(torch.uint8).reshape(self.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, per_channel={self.per_channel}"
