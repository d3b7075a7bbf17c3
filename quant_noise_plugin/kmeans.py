"""k-means for product quantization: faiss when installed, a vectorised torch fallback otherwise.

Every block is used (faiss subsamples to ``max_points_per_centroid * k`` points by default; we
raise that cap so it never does), the seed is fixed, and empty clusters are re-seeded.

``importance`` (same shape as the points, or broadcastable) weighs each coordinate of each point in
both the assignment and the centroid update: sum_d w_id (x_id - c_kd)^2, the diagonal of a layer's
input second moments (GPTVQ, VPTQ) turning weight error into output error. faiss has no
per-coordinate weights, so that objective runs on the torch backend (two matmuls per chunk).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")


@dataclass
class KMeansResult:
    centroids: Tensor  # (k, d) float32
    assignments: Tensor  # (n,) int64
    objective: float  # sum of squared distances of every point to its centroid
    history: List[float] = field(default_factory=list)  # objective after each iteration (torch backend)


def _import_faiss():
    """faiss, without its loader's INFO lines: it tries the AVX512 and AVX2 builds first and logs
    ``ModuleNotFoundError`` for each one the wheel lacks, which reads like a failure but is not."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def faiss_available() -> bool:
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


class _Distances:
    """Squared (importance-weighted) distances of fixed points to changing centroids, by one matmul a chunk:
    sum_d w (x - c)^2 = sum_d w x^2 + [w x, w] @ [-2 c, c^2]^T. The points' own term and the left factor are
    computed once per k-means, not once per iteration (and the point term is not needed to pick the nearest)."""

    def __init__(self, points: Tensor, importance: Optional[Tensor] = None):
        if importance is None:
            self.lhs = torch.cat([points, points.new_ones(points.shape[0], 1)], dim=1)
            self.own = (points * points).sum(dim=1)
        else:
            weights = importance.expand_as(points)
            weighted = weights * points
            self.lhs = torch.cat([weighted, weights], dim=1)
            self.own = (weighted * points).sum(dim=1)
        self.weighted = importance is not None

    def nearest(self, centroids: Tensor, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
        squares = centroids * centroids
        rhs = torch.cat([-2.0 * centroids, squares if self.weighted else squares.sum(dim=1, keepdim=True)], dim=1).T.contiguous()
        labels, dists = [], []
        for start in range(0, self.lhs.shape[0], chunk):
            dist, label = (self.lhs[start : start + chunk] @ rhs).min(dim=1)
            labels.append(label)
            dists.append(dist)
        return torch.cat(labels), (torch.cat(dists) + self.own).clamp_min_(0.0)


def assign(points: Tensor, centroids: Tensor, chunk: int = 1 << 16, importance: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each point and its (importance-weighted) squared distance, in chunks to bound memory."""
    return _Distances(points, importance).nearest(centroids, chunk)


def _kmeans_torch(points: Tensor, k: int, n_iter: int, seed: int, importance: Optional[Tensor] = None) -> KMeansResult:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n = points.shape[0]
    init = torch.randperm(n, generator=generator)[:k].to(points.device)  # without replacement
    centroids = points[init].clone()
    distances = _Distances(points, importance)
    d = points.shape[1]
    history: List[float] = []
    labels = None
    for _ in range(n_iter):
        new_labels, dists = distances.nearest(centroids)
        history.append(float(dists.sum()))
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        # each cluster's sums of [w x, w] (or [x, 1]) in one pass: the (weighted) means' numerators and denominators
        totals = points.new_zeros(k, distances.lhs.shape[1]).index_add_(0, labels, distances.lhs)
        sums, mass = totals[:, :d], totals[:, d:]
        nonempty = torch.bincount(labels, minlength=k) > 0
        if importance is None:
            centroids[nonempty] = sums[nonempty] / mass[nonempty]
        else:  # per coordinate: the importance-weighted mean of the cluster's points (a coordinate weighing 0 keeps its value)
            update = nonempty.unsqueeze(1) & (mass > 0)
            centroids[update] = sums[update] / mass[update]
        empty = (~nonempty).nonzero().flatten()
        if empty.numel():
            # Re-seed each empty cluster on one of the points farthest from its centroid:
            # that point's error drops to zero, so the objective cannot increase.
            far = dists.topk(empty.numel()).indices
            centroids[empty] = points[far]
    labels, dists = distances.nearest(centroids)
    objective = float(dists.sum())
    history.append(objective)
    return KMeansResult(centroids, labels, objective, history)


def _kmeans_faiss(points: Tensor, k: int, n_iter: int, seed: int) -> KMeansResult:
    faiss = _import_faiss()

    x = points.detach().cpu().float().contiguous().numpy()
    n, d = x.shape
    km = faiss.Kmeans(
        d,
        k,
        niter=n_iter,
        seed=seed,
        verbose=False,
        max_points_per_centroid=math.ceil(n / k) + 1,  # never subsample
        min_points_per_centroid=1,
    )
    km.train(x)
    centroids = torch.from_numpy(km.centroids.copy())
    labels, dists = assign(points.detach().cpu().float(), centroids)
    history = [float(v) for v in km.obj]
    return KMeansResult(centroids, labels, float(dists.sum()), history)


def _broadcasts(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def kmeans(points: Tensor, k: int, n_iter: int = 20, seed: int = 0, backend: str = "auto",
           importance: Optional[Tensor] = None) -> KMeansResult:
    """Cluster ``points`` (n, d) into ``k`` centroids; ``importance`` (non-negative, broadcastable to
    ``points``) weighs each coordinate's squared error, and its objective is the weighted one.

    backend: "faiss", "torch" (runs on ``points``' device, CUDA included) or "auto" (faiss for
    CPU tensors when installed and no importance is given, torch otherwise).
    """
    n = points.shape[0]
    if k > n:
        raise ValueError(f"{k} centroids for only {n} blocks: use at most {n} centroids")
    if importance is not None:
        if importance.dim() != 2 or not _broadcasts(importance.shape, points.shape):
            raise ValueError(f"importance of shape {tuple(importance.shape)} does not broadcast to the points' {tuple(points.shape)}")
        if bool((importance < 0).any()):
            raise ValueError("importance must be non-negative")
        if backend == "faiss":
            raise ValueError("the faiss backend has no per-coordinate weights: use backend torch or auto with an importance")
        backend = "torch"
    if backend == "auto":
        backend = "faiss" if points.device.type == "cpu" and faiss_available() else "torch"
    if backend == "faiss":
        result = _kmeans_faiss(points, k, n_iter, seed)
    elif backend == "torch":
        weights = None if importance is None else importance.detach().float().to(points.device)
        result = _kmeans_torch(points.detach().float(), k, n_iter, seed, weights)
    else:
        raise ValueError(f"unknown k-means backend {backend!r} ({', '.join(BACKENDS)})")
    return KMeansResult(
        result.centroids.to(points.device),
        result.assignments.to(points.device),
        result.objective,
        result.history,
    )
