"""A PQ layer's weight in inference kept as its codes: F.linear and F.embedding compute from them. Plain torch.

``PQCodesWeight`` is what weight_swap puts in place of a PQ layer's weight in inference (as it puts the
decoded weight, or an int8 weight): a tensor subclass holding the layer's centroids and codes. ``F.linear``
with it runs lookup tables (lut.py) for calls of at most ``lut_rows`` input rows and a float weight for
larger ones; ``F.embedding`` decodes only the rows looked up; any other use sees the float weight.

``QUANT_NOISE_INFERENCE`` says what the float weight is and where the tables run, per process:

- ``decoded``: no tables; the weight decoded once and reused (decoded.py), as before this mode existed.
- ``codes``: no float weight is kept: the tables run up to the number of rows where they measured faster than
  decoding the weight for the call; larger calls (batched scoring) decode it for that call only. The model in
  memory is its codes and centroids: for memory-bound machines, and token-by-token generation.
- ``auto`` (default): per layer shape, the tables run up to the number of rows where they measured faster
  (by ``MIN_SPEEDUP``) than the decoded weight, which larger calls use, decoded once on first need as today;
  an Embedding looks rows up from its codes. So batched scoring runs and weighs as before, and generation takes
  the tables where they win (big layers, few rows).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import lut
from .bitpack import bits_for, pack_bits, smallest_int_dtype
from .int8_linear import MIN_SPEEDUP, best_time
from .weight_swap import ComputedWeight

INFERENCE_SWITCH = "QUANT_NOISE_INFERENCE"
MODES = ("auto", "codes", "decoded")
PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the row counts measured, in order; the tables stop at the first loss


def inference_mode() -> str:
    """``QUANT_NOISE_INFERENCE``: auto (default), codes or decoded (see the module docstring)."""
    value = os.environ.get(INFERENCE_SWITCH, "auto")
    if value not in MODES:
        raise ValueError(f"{INFERENCE_SWITCH}={value!r}: use auto, codes or decoded")
    return value


@functools.lru_cache(maxsize=None)
def measured_lut_rows(out_features: int, in_features: int, block_size: int, n_centroids: int, against: str,
                      compact: bool = False) -> int:
    """The most input rows (of ``PROBE_ROWS``) for which the lookup tables beat the float path on this machine,
    0 where they never do; measured once per shape and process on random codes, the two interleaved, best of
    several runs. ``against``: "decoded" (a float weight already in memory; the tables must win by
    ``MIN_SPEEDUP``) or "decode" (decoding the weight for the call, then F.linear: the faster of the two wins);
    ``compact``: the codes bit-packed in memory (PQCodebook.compact), as the layer will hold them."""
    generator = torch.Generator().manual_seed(0)
    centroids = torch.randn(n_centroids, block_size, generator=generator)
    codes = torch.randint(0, n_centroids, (out_features, in_features // block_size), generator=generator)
    codes = codes.to(smallest_int_dtype(n_centroids))
    weight = lut.decode(centroids, codes).contiguous()
    if compact:
        stream = pack_bits(codes, bits_for(n_centroids))
        codes = lut.BitCodes(torch.cat([stream, stream.new_zeros(2)]), bits_for(n_centroids), tuple(codes.shape))
    margin = MIN_SPEEDUP if against == "decoded" else 1.0
    best_rows = 0
    with torch.no_grad():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, in_features, generator=generator)
            tables = functools.partial(lut.lut_linear, x, centroids, codes)
            dense = ((lambda: F.linear(x, weight)) if against == "decoded"
                     else (lambda: F.linear(x, lut.decode(centroids, codes))))
            for fn in (tables, dense):  # warm up both (the first numba call compiles)
                fn()
            times = {tables: float("inf"), dense: float("inf")}
            for _ in range(3):  # interleaved single calls, best of: a big layer's decode is ~100 ms
                for fn in times:
                    times[fn] = min(times[fn], best_time(fn, repeat=1, calls=1))
            if times[dense] < margin * times[tables]:
                break
            best_rows = rows
    return best_rows


class PQCodesWeight(ComputedWeight):
    """A PQ weight as centroids and codes, computing F.linear / F.embedding from them; see the module docstring."""

    @staticmethod
    def __new__(cls, centroids: Tensor, codes: lut.Codes, shape: Tuple[int, int], lut_rows: Union[int, Callable[[], int]],
                float_weight: Callable[[], Tensor], why: str = ""):
        return Tensor._make_wrapper_subclass(cls, shape, dtype=centroids.dtype, device=centroids.device, requires_grad=False)

    def __init__(self, centroids: Tensor, codes: lut.Codes, shape: Tuple[int, int], lut_rows: Union[int, Callable[[], int]],
                 float_weight: Callable[[], Tensor], why: str = ""):
        """``centroids`` (K, b) and ``codes`` (out * in / b, or bit-packed: lut.BitCodes) as the PQCodebook holds them
        (not copied);
        ``lut_rows``: calls with at most this many input rows run the tables (or what measures it, called when a
        Linear first needs it: an Embedding never does); ``float_weight``: the float weight for everything else
        (the decoded cache in auto, a decode for the call in codes mode)."""
        self.centroids = centroids
        self.codes = codes if isinstance(codes, lut.BitCodes) else codes.view(shape[0], -1)
        self._lut_rows = lut_rows
        self._float_weight = float_weight
        self.why = why

    def float_value(self) -> Tensor:
        return self._float_weight()

    @property
    def lut_rows(self) -> int:
        if callable(self._lut_rows):
            self._lut_rows = int(self._lut_rows())
        return self._lut_rows

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows <= self.lut_rows and x.device == self.centroids.device:
            return lut.lut_linear(x, self.centroids, self.codes, bias)
        return F.linear(x, self.float_value().to(x.dtype), bias)

    computes_embedding = True

    def embedding(self, indices: Tensor, max_norm: Optional[float] = None) -> Tensor:
        if max_norm is not None:  # F.embedding would renormalize the weight in place: codes cannot be
            raise ValueError("an Embedding with max_norm rewrites its weight in place: it cannot compute from PQ codes")
        return lut.embedding_rows(indices, self.centroids, self.codes)

    def __repr__(self) -> str:
        return (f"PQCodesWeight(shape={tuple(self.shape)}, K={self.centroids.shape[0]}, block={self.centroids.shape[1]}, "
                f"lut_rows={self.lut_rows})")
