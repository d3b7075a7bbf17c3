"""Pack small unsigned integer codes into bytes (and back): plain torch."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def bits_for(n_values: int) -> int:
    """Bits needed to store one code of an alphabet of ``n_values`` symbols."""
    return max(1, math.ceil(math.log2(n_values)))


def smallest_int_dtype(n_values: int) -> torch.dtype:
    """The smallest integer dtype that holds codes 0..n_values-1."""
    if n_values <= 256:
        return torch.uint8
    if n_values <= 2**15:
        return torch.int16
    return torch.int32


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Flatten ``codes`` (values < 2**bits) into a uint8 tensor of ceil(n*bits/8) bytes.

    Any width 1..32: a 1024-centroid codebook stores 10 bits per code, not the 16 of its int16 buffer.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"pack_bits supports 1..32 bits, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code {int(flat.max())} does not fit in {bits} bits")
    shifts = torch.arange(bits - 1, -1, -1, device=flat.device)
    bitstream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device=flat.device)
    return (bitstream * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as int64."""
    shifts = torch.arange(7, -1, -1, device=packed.device)
    bitstream = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=packed.device)
    return (bitstream.reshape(count, bits) * weights).sum(dim=1)
