"""Codes with error feedback (the idea of GPTQ, Frantar et al. 2022; for vectors, GPTVQ), in plain torch.

Round-to-nearest quantizes every weight on its own. A Linear's output error for an input x is
(W - Q) x, so what matters is sum_rows (w - q)^T H (w - q) with H = E[x x^T], the layer's input
second moments (calibration.py collects them). GPTQ quantizes the columns of W one at a time, and after
each column spreads the error it made over the columns not yet quantized, along H's inverse: the rows
keep the output they had as well as the remaining columns can. The grid (per-row scale and zero point)
is round-to-nearest's, so the stored format and the loaders do not change; only which code each weight
gets does.

The same feedback chooses product-quantization codes (``assign_codes_with_error_feedback``, GPTVQ's idea, van
Baalen et al. 2024): the centroids stay those k-means fitted; the columns are taken a block (b consecutive
inputs) at a time, each row's block gets the centroid nearest in the metric that block's error costs once the
later columns compensate, and the error spreads over those later columns.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .kmeans import assign
from .scalar import affine_params

DAMPING = 0.01  # of H's mean diagonal, added to the diagonal: H stays invertible (GPTQ's own default)
BLOCK = 128  # columns updated together: the error of a block reaches the later columns in one matmul
REFIT_UNKNOWNS = 4096  # the largest least-squares centroid refit (n_centroids x block): K=512 at blocks of 8


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
    inverse_factor = _inverse_factor(hessian, damping)
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


def _inverse_factor(hessian: Tensor, damping: float) -> Tensor:
    """The upper Cholesky factor U of H^-1 (damped; a column no input reached counts as unit): row i holds how
    column i's error moves the later columns, and U[g, g] for a group g of columns gives the metric its error
    costs once the later columns compensate."""
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


@torch.no_grad()
def assign_codes_with_error_feedback(weight: Tensor, hessian: Tensor, centroids: Tensor, damping: float = DAMPING) -> Tensor:
    """PQ codes (int64, one per block of ``centroids.shape[1]`` consecutive weights of a row, row-major as
    pq.PQCodebook stores them) of a (rows, cols) ``weight`` whose inputs have second moments ``hessian``.

    Fixing a group g of columns to q costs sum_rows (w_g - q)^T (U_gg^T U_gg)^-1 (w_g - q) once the later columns
    have moved to compensate (U: the upper Cholesky factor of H^-1), so the nearest centroid is taken after both
    sides are multiplied by U_gg^-1; then the group's error moves the later columns as in GPTQ."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    block = centroids.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"input moments of shape {tuple(hessian.shape)} for a weight with {cols} inputs")
    if cols % block:
        raise ValueError(f"block size {block} does not divide the weight's {cols} inputs")
    u_full = _inverse_factor(hessian, damping)
    centroids = centroids.detach().float()
    codes = torch.empty(rows, cols // block, dtype=torch.long)
    for group, start in enumerate(range(0, cols, block)):
        end = start + block
        u = u_full[start:end, start:end]
        metric = torch.linalg.solve_triangular(u, torch.eye(block), upper=True)  # U_gg^-1
        labels, _ = assign(w[:, start:end] @ metric, centroids @ metric)
        codes[:, group] = labels
        chosen = centroids[labels]
        errors = torch.empty(rows, block)
        for i in range(block):  # the group's own columns first (their codes are fixed), then the rest in one matmul
            column = start + i
            errors[:, i] = (w[:, column] - chosen[:, i]) / u_full[column, column]
            w[:, column:end] -= errors[:, i : i + 1] * u_full[column, column:end].unsqueeze(0)
        w[:, end:] -= errors @ u_full[start:end, end:]
    return codes.reshape(-1)


@torch.no_grad()
def fit_centroids_to_output(weight: Tensor, hessian: Tensor, codes: Tensor, centroids: Tensor, row_weights: Optional[Tensor] = None,
                            damping: float = DAMPING) -> Tensor:
    """The centroids that minimize sum_rows f_r (w_r - q_r)^T H (w_r - q_r) for fixed ``codes`` (f: ``row_weights``,
    default 1): H couples the blocks of a row, so it is one linear system of n_centroids x block unknowns, built
    from how often two centroids share a row at two block positions. A ridge towards ``centroids`` (``damping`` of
    the system's mean diagonal) keeps a centroid no block uses where it was."""
    rows, cols = weight.shape
    n_centroids, block = centroids.shape
    groups = cols // block
    one_hot = torch.nn.functional.one_hot(codes.reshape(rows, groups).long(), n_centroids).double()  # (rows, groups, K)
    weighted = one_hot if row_weights is None else one_hot * row_weights.double().reshape(rows, 1, 1)
    flat = one_hot.reshape(rows, groups * n_centroids)
    h = hessian.detach().double().reshape(groups, block, groups, block)
    system = torch.zeros(n_centroids, block, n_centroids, block, dtype=torch.float64)
    for group in range(groups):  # one block position at a time: (K, groups x K) counts in memory, not (groups x K)^2
        shared = (weighted[:, group, :].T @ flat).reshape(n_centroids, groups, n_centroids)
        system += torch.einsum("klm,alc->kamc", shared, h[group])
    system = system.reshape(n_centroids * block, n_centroids * block)
    target = (weight.detach().double() @ hessian.detach().double()).reshape(rows, groups, block)
    rhs = torch.einsum("rjk,rja->ka", weighted, target).reshape(-1)
    ridge = damping * torch.diagonal(system).mean().clamp_min(1e-30)
    system += ridge * torch.eye(n_centroids * block, dtype=system.dtype)
    rhs += ridge * centroids.detach().double().reshape(-1)
    return torch.linalg.solve(system, rhs).reshape(n_centroids, block).float()


@torch.no_grad()
def quantize_pq_to_output(weight: Tensor, hessian: Tensor, centroids: Tensor, rounds: int = 2,
                          row_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, float]:
    """Codes by error feedback and centroids by least squares on the output error, alternated ``rounds`` times
    from k-means' ``centroids``; returns (centroids, codes, relative output error). Each step lowers its own
    objective; the pair is kept only while the output error falls. Above REFIT_UNKNOWNS centroid coordinates the
    system is too large for a few seconds (K=1024 x 8: minutes, GBs): the codes alone, once."""
    current = centroids.detach().float()
    refit = centroids.numel() <= REFIT_UNKNOWNS
    best = None
    for _ in range(rounds if refit else 1):
        codes = assign_codes_with_error_feedback(weight, hessian, current)
        if refit:
            current = fit_centroids_to_output(weight, hessian, codes, current, row_weights)
        error = output_error(weight, current[codes].reshape(weight.shape), hessian)
        if best is not None and error >= best[2]:
            break
        best = (current, codes, error)
    return best


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor, row_weights: Optional[Tensor] = None) -> float:
    """sum_rows f_r (w - q)^T H (w - q) / sum_rows f_r w^T H w: the relative error on the layer's outputs (f: the rows'
    weights, e.g. an embedding's look-up frequencies; default 1)."""
    diff = (weight - approx).double()
    w = weight.double()
    h = hessian.double()
    f = 1.0 if row_weights is None else row_weights.double().reshape(-1, 1)
    return float((f * (diff @ h) * diff).sum() / (f * (w @ h) * w).sum().clamp_min(1e-30))
