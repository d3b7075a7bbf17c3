"""Scalar codes with error feedback (the idea of GPTQ, Frantar et al. 2022), in plain torch.

Round-to-nearest quantizes every weight on its own. A Linear's output error for an input x is
(W - Q) x, so what matters is sum_rows (w - q)^T H (w - q) with H = E[x x^T], the layer's input
second moments (calibration.py collects them). GPTQ quantizes the columns of W one at a time, and after
each column spreads the error it made over the columns not yet quantized, along H's inverse: the rows
keep the output they had as well as the remaining columns can. The grid (per-row scale and zero point)
is round-to-nearest's, so the stored format and the loaders do not change; only which code each weight
gets does.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .scalar import affine_params

DAMPING = 0.01  # of H's mean diagonal, added to the diagonal: H stays invertible (GPTQ's own default)
BLOCK = 128  # columns updated together: the error of a block reaches the later columns in one matmul


@torch.no_grad()
def quantize_with_error_feedback(weight: Tensor, hessian: Tensor, bits: int, per_channel: bool = True, symmetric: bool = False,
                                 damping: float = DAMPING, block: int = BLOCK) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer codes (uint8) and their (scale, zero_point) for a (rows, cols) ``weight`` whose inputs have
    second moments ``hessian`` (cols, cols). Columns no input reached (zero diagonal) are rounded as they are."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"input moments of shape {tuple(hessian.shape)} for a weight with {cols} inputs")
    scale, zero_point = affine_params(w, bits, per_channel, symmetric)
    qmax = 2**bits - 1
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += damping * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    # the upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns
    inverse_factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.empty_like(w, dtype=torch.uint8)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        chunk = w[:, start:end].clone()
        errors = torch.empty_like(chunk)
        u = inverse_factor[start:end, start:end]
        for i in range(end - start):
            column = chunk[:, i]
            q = torch.clamp(torch.round(column / scale[:, 0]) + zero_point[:, 0], 0, qmax)
            codes[:, start + i] = q.to(torch.uint8)
            error = (column - (q - zero_point[:, 0]) * scale[:, 0]) / u[i, i]
            chunk[:, i:] -= error.unsqueeze(1) * u[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ inverse_factor[start:end, end:]
    return codes, scale, zero_point


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """sum_rows (w - q)^T H (w - q) / sum_rows w^T H w: the relative error on the layer's outputs."""
    diff = (weight - approx).double()
    w = weight.double()
    h = hessian.double()
    return float(((diff @ h) * diff).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
