"""A product-quantized weight computed from its codes, never decoded whole: lookup tables. Plain torch (+ numba).

A PQ weight W (out, in) is ``codes`` (out, in / b) into ``centroids`` (K, b). For an input x (n, in), y = x W^T is
per input block j a table ``T[n, j, k] = <x[n, block j], centroids[k]>`` (one small matmul: n * in * K MACs), and
``y[n, o] = sum_j T[n, j, codes[o, j]]`` (out * in / b table reads, no float weight read from memory). That wins
where a dense layer is bound by reading its weight: a few rows (token-by-token generation) through layers too big
for the cache, the case AQLM's CPU kernels are built for. With many rows the dense matmul's arithmetic wins, and
the caller decodes the weight instead (``decode``).

The tables and their sums are one numba kernel, parallel over blocks then output rows (``QUANT_NOISE_NUMBA=0``
turns it off); ``lut_linear_reference`` is the same in plain torch: what the kernel is tested against, and the path
taken where numba is not installed. An Embedding decodes only the rows a batch looks up (``embedding_rows``). Codes of
fewer than 8 bits may stay bit-packed in memory, as on disk (``BitCodes``): the kernel reads each from a 24-bit window.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

NUMBA_SWITCH = "QUANT_NOISE_NUMBA"
_REFERENCE_CHUNK = 1 << 22  # table reads per chunk of the torch reference (its (n, out, in/b) gather is transient)


@functools.lru_cache(maxsize=None)
def _numba_kernels():
    """The compiled (codes, bit-packed codes) forms of ``lut_linear``, or None where numba is missing (one log line)."""
    # fairseq's wav2vec2_classification sets the root logger to DEBUG at import (basicConfig): without this, every
    # fairseq CLI that loads a packed model prints numba's compiler trace (~16,000 lines a kernel)
    logging.getLogger("numba").setLevel(logging.WARNING)
    try:
        import numba
        import numpy as np
    except ImportError:
        logger.info("numba is not installed: PQ layers computing from their codes use the plain-torch lookup tables (slower)")
        return None

    # One call computes the tables and sums them, both in numba's threads: a torch matmul for the tables just before
    # would leave torch's OpenMP threads spinning on the cores the sums need (measured: 141 against 103 us on a
    # 1024 x 1024 layer at block 4, one row).
    @numba.njit(parallel=True, cache=True, fastmath=True)
    def tables_of(x, centroids_t, n_blocks):  # pragma: no cover  (compiled; tested through lut_linear)
        n_rows = x.shape[0]
        block, k = centroids_t.shape
        tables = np.empty((n_rows, n_blocks, k), dtype=np.float32)
        for row_block in numba.prange(n_rows * n_blocks):
            n = row_block // n_blocks
            j = row_block - n * n_blocks
            table = tables[n, j]
            for c in range(k):
                table[c] = 0.0
            for b in range(block):
                value = x[n, j * block + b]
                coordinate = centroids_t[b]
                for c in range(k):
                    table[c] += value * coordinate[c]
        return tables

    @numba.njit(parallel=True, cache=True, fastmath=True)
    def linear_codes(x, centroids_t, codes, out):  # pragma: no cover
        n_out, n_blocks = codes.shape
        tables = tables_of(x, centroids_t, n_blocks)
        n_rows = x.shape[0]
        for group in numba.prange((n_out + 3) // 4):  # four output rows at once: four independent sums in flight
            first = group * 4
            if first + 4 <= n_out:
                for n in range(n_rows):
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for j in range(n_blocks):
                        table = tables[n, j]
                        s0 += table[codes[first, j]]
                        s1 += table[codes[first + 1, j]]
                        s2 += table[codes[first + 2, j]]
                        s3 += table[codes[first + 3, j]]
                    out[n, first] = s0
                    out[n, first + 1] = s1
                    out[n, first + 2] = s2
                    out[n, first + 3] = s3
            else:
                for o in range(first, n_out):
                    for n in range(n_rows):
                        s = np.float32(0.0)
                        for j in range(n_blocks):
                            s += tables[n, j, codes[o, j]]
                        out[n, o] = s

    @numba.njit(parallel=True, cache=True, fastmath=True)
    def linear_bits(x, centroids_t, stream, bits, n_blocks, out):  # pragma: no cover
        tables = tables_of(x, centroids_t, n_blocks)
        n_rows, n_out = out.shape
        mask = (1 << bits) - 1
        for o in numba.prange(n_out):
            for n in range(n_rows):
                s = np.float32(0.0)
                position = o * n_blocks * bits
                for j in range(n_blocks):
                    byte = position >> 3
                    window = (np.int32(stream[byte]) << 16) | (np.int32(stream[byte + 1]) << 8) | np.int32(stream[byte + 2])
                    s += tables[n, j, (window >> (24 - (position & 7) - bits)) & mask]
                    position += bits
                out[n, o] = s

    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    return linear_codes, linear_bits


@dataclass(frozen=True)
class BitCodes:
    """Codes (out, in / b) kept bit-packed in memory: ``stream`` is bitpack.pack_bits' MSB-first bitstream of the
    row-major codes plus 2 zero bytes, so that every code is read from one 24-bit window."""

    stream: Tensor
    bits: int
    shape: Tuple[int, int]

    def rows(self, rows: Tensor) -> Tensor:
        """The codes of the given output rows, (len(rows), in / b) as int64."""
        n_blocks = self.shape[1]
        index = rows.reshape(-1, 1).long() * n_blocks + torch.arange(n_blocks, device=rows.device)
        position = index * self.bits
        byte = (position >> 3).reshape(-1)
        stream = self.stream  # only the bytes read are widened (not the whole stream at every lookup)
        window = (stream[byte].long() << 16) | (stream[byte + 1].long() << 8) | stream[byte + 2].long()
        return ((window >> (24 - (position.reshape(-1) & 7) - self.bits)) & ((1 << self.bits) - 1)).view(index.shape)

    def all(self) -> Tensor:
        return self.rows(torch.arange(self.shape[0], device=self.stream.device))


Codes = Union[Tensor, BitCodes]


def numba_enabled() -> bool:
    """The numba kernel runs (installed, and not turned off with ``QUANT_NOISE_NUMBA=0``)."""
    return os.environ.get(NUMBA_SWITCH, "1") != "0" and _numba_kernels() is not None


def lookup_tables(x: Tensor, centroids: Tensor) -> Tensor:
    """(n, in) inputs -> (n, in / b, K): each input block's dot product with every centroid."""
    n, block = x.shape[0], centroids.shape[1]
    return torch.mm(x.reshape(-1, block), centroids.t()).view(n, -1, centroids.shape[0])


def gather_sum(tables: Tensor, codes: Codes) -> Tensor:
    """(n, out): out[n, o] = sum_j tables[n, j, codes[o, j]], in plain torch (chunked over n)."""
    codes = codes.all() if isinstance(codes, BitCodes) else codes
    n, n_blocks, k = tables.shape
    flat = codes.long() + torch.arange(n_blocks, device=codes.device) * k  # (out, in / b) into tables[n].view(-1)
    rows = max(1, _REFERENCE_CHUNK // max(1, flat.numel()))
    tables = tables.reshape(n, n_blocks * k)
    return torch.cat([tables[start:start + rows, flat].sum(-1) for start in range(0, n, rows)]) if n else tables.new_zeros(0, codes.shape[0])


def lut_linear_reference(x: Tensor, centroids: Tensor, codes: Codes) -> Tensor:
    """The tables and their sums in plain torch, for a 2-D x: what the numba kernel is tested against."""
    return gather_sum(lookup_tables(x, centroids), codes)


def lut_linear(x: Tensor, centroids: Tensor, codes: Codes, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, decode(centroids, codes), bias) by lookup tables; ``codes``: (out, in / b), any leading dims of x.
    On the numba kernels where they run (CPU, float32), else ``lut_linear_reference``."""
    n_out, n_blocks = codes.shape
    x2 = x.reshape(-1, n_blocks * centroids.shape[1]).to(centroids.dtype)
    kernels = _numba_kernels() if numba_enabled() else None
    if kernels is None or x2.device.type != "cpu" or x2.dtype != torch.float32:
        y = lut_linear_reference(x2, centroids, codes)
    else:
        y = torch.empty(x2.shape[0], n_out)
        centroids_t = centroids.t().contiguous().numpy()
        if isinstance(codes, BitCodes):
            kernels[1](x2.contiguous().numpy(), centroids_t, codes.stream.numpy(), codes.bits, n_blocks, y.numpy())
        else:
            kernels[0](x2.contiguous().numpy(), centroids_t, codes.contiguous().numpy(), y.numpy())
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], n_out)


def decode(centroids: Tensor, codes: Codes) -> Tensor:
    """The float weight (out, in) the codes stand for: built on demand, for the caller to drop."""
    codes = codes.all() if isinstance(codes, BitCodes) else codes
    return torch.index_select(centroids, 0, codes.reshape(-1).long()).view(codes.shape[0], -1)


def embedding_rows(indices: Tensor, centroids: Tensor, codes: Codes) -> Tensor:
    """F.embedding(indices, decode(centroids, codes)), decoding only the rows looked up."""
    rows = codes.rows(indices) if isinstance(codes, BitCodes) else codes[indices.reshape(-1)]  # (m, dim / b)
    return torch.index_select(centroids, 0, rows.reshape(-1).long()).view(*indices.shape, -1)
