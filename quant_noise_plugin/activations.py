"""int8 activations: observers, per-tensor affine parameters, fake quantization. Plain torch.

An activation (the input of a Linear) is stored as uint8 codes, ``x ~= (codes - zero_point) * scale``,
one (scale, zero_point) per layer. The range comes from a calibration pass over training batches
(``ActivationStats``: the range, then a histogram of every value) through one of three observers:

- ``minmax``: the exact range seen; never clips, but one outlier stretches every step;
- ``percentile``: the 0.01% / 99.99% quantiles; clips the tails;
- ``mse``: the clipping range that minimises the expected squared error (rounding inside the range,
  clipping outside), searched on a histogram of the observed values.

Affine rather than symmetric: the input of fc2 follows a ReLU (nothing below 0), where an affine
range uses all 256 levels and a symmetric one half of them; on a roughly symmetric input both agree.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

OBSERVERS = ("minmax", "percentile", "mse")
ACTIVATION_BITS = (8,)
PERCENTILE = 1e-4  # each tail the percentile observer clips
HISTOGRAM_BINS = 2048


def check_activation_bits(bits: int, flag: str = "--activation-bits") -> None:
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"{flag}={bits}: activations are quantized to {ACTIVATION_BITS[0]} bits only (int8 kernels)")


def affine_qparams(lo: float, hi: float, bits: int = 8) -> Tuple[float, int]:
    """(scale, zero_point) of the uint range [0, 2**bits - 1] covering [lo, hi] (0 always representable)."""
    qmax = 2**bits - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zero_point


def fake_quantize_activation(x: Tensor, scale: float, zero_point: int, bits: int = 8) -> Tensor:
    """Quantize then dequantize with fixed parameters (the arithmetic the int8 kernels do on their input: x times
    1/scale, as int8_linear.quantize_input and torch's fake_quantize round, so a value at a rounding tie lands
    on the kernel's code)."""
    qmax = 2**bits - 1
    return (torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, qmax) - zero_point) * scale


class ActivationStats:
    """What calibration records of one layer's input, in two passes over the same batches.

    Pass 1 (``observe_range``): the exact range. Pass 2 (``observe_histogram``): a histogram of every
    value over that range, from which the percentile and mse observers read their ranges.
    """

    def __init__(self) -> None:
        self.lo, self.hi = float("inf"), float("-inf")
        self.counts = None

    @torch.no_grad()
    def observe_range(self, x: Tensor) -> None:
        if x.numel():
            lo, hi = torch.aminmax(x.detach().float())
            self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))

    @torch.no_grad()
    def observe_histogram(self, x: Tensor) -> None:
        lo, hi = self.bounds
        counts = torch.histc(x.detach().double().reshape(-1).cpu(), bins=HISTOGRAM_BINS, min=lo, max=hi)
        self.counts = counts if self.counts is None else self.counts + counts

    @property
    def observed(self) -> bool:
        return self.lo <= self.hi

    @property
    def bounds(self) -> Tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("no activation was observed")
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        return (lo, hi) if hi > lo else (lo, lo + 1e-8)

    def range(self, observer: str) -> Tuple[float, float]:
        if observer not in OBSERVERS:
            raise ValueError(f"unknown observer {observer!r} (use {', '.join(OBSERVERS)})")
        if observer == "minmax":
            return self.bounds
        if self.counts is None:
            raise ValueError(f"the {observer} observer needs the histogram pass")
        lo, hi = self.bounds
        if observer == "percentile":
            return histogram_quantile(self.counts, lo, hi, PERCENTILE), histogram_quantile(self.counts, lo, hi, 1 - PERCENTILE)
        return mse_range(self.counts, lo, hi)

    def qparams(self, observer: str, bits: int = 8) -> Tuple[float, int]:
        return affine_qparams(*self.range(observer), bits=bits)


def histogram_quantile(counts: Tensor, lo: float, hi: float, q: float) -> float:
    """The q-quantile of the values a histogram over [lo, hi] counts (linear within a bin)."""
    cumulative = torch.cumsum(counts, 0)
    target = q * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype)))
    index = min(index, counts.numel() - 1)
    before = float(cumulative[index - 1]) if index else 0.0
    inside = (target - before) / max(float(counts[index]), 1e-12)
    width = (hi - lo) / counts.numel()
    return lo + width * (index + min(max(inside, 0.0), 1.0))


def mse_range(counts: Tensor, lo: float, hi: float, bits: int = 8, steps: int = 64) -> Tuple[float, float]:
    """The clipping range [a, b] within [lo, hi] with the least expected squared quantization error.

    Candidates shrink each end towards 0 in ``steps`` steps (a grid over both ends); the error of
    each, from the histogram ``counts`` over [lo, hi]: step^2 / 12 for each value inside, the
    squared distance to the range for each value clipped outside.
    """
    bins = counts.numel()
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1]  # how much of each side to cut
    a = (lo * (1 - fractions)).reshape(-1, 1, 1)
    b = (hi * (1 - fractions)).reshape(1, -1, 1)
    step = (b - a).clamp_min(1e-12) / (2**bits - 1)
    error = torch.where(centres < a, (a - centres) ** 2, torch.where(centres > b, (centres - b) ** 2, step**2 / 12))
    total = (error * counts.double()).sum(dim=-1)
    i, j = divmod(int(torch.argmin(total)), total.shape[1])
    return float(a.flatten()[i]), float(b.flatten()[j])


class ActivationQuantizer(nn.Module):
    """The stored form of one layer's input quantization: per-tensor affine uint8.

    ``forward(x)`` fake-quantizes ``x`` (the reference the int8 kernels must match).
    """

    def __init__(self, scale: float = 1.0, zero_point: int = 0, bits: int = 8):
        super().__init__()
        check_activation_bits(bits)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int32))
        self.register_buffer("n_bits", torch.tensor(int(bits), dtype=torch.uint8))

    def packed_state(self, float_dtype=None, centroid_bits=None, symmetric: bool = False):
        """Stored as they are: an fp16 scale would move every quantization step."""
        return {"scale": self.scale, "zero_point": self.zero_point, "n_bits": self.n_bits}

    @property
    def params(self) -> Tuple[float, int]:
        return float(self.scale), int(self.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = self.params
        return fake_quantize_activation(x, scale, zero_point, int(self.n_bits))

    def extra_repr(self) -> str:
        scale, zero_point = self.params
        return f"scale={scale:.4g}, zero_point={zero_point}, bits={int(self.n_bits)}"
