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


def assign(points: Tensor, centroids: Tensor, chunk: int = 1 << 16, importance: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each point and its (importance-weighted) squared distance, in chunks to bound memory."""
    c_sq = (centroids * centroids).sum(dim=1)
    if importance is not None:
        importance = importance.expand_as(points)
    labels, dists = [], []
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk]
        if importance is None:
            d = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ centroids.T + c_sq
        else:
            w = importance[start : start + chunk]
            wx = w * x
            d = (wx * x).sum(dim=1, keepdim=True) - 2.0 * wx @ centroids.T + w @ (centroids * centroids).T
        dist, label = d.min(dim=1)
        labels.append(label)
        dists.append(dist.clamp_min_(0.0))
    return torch.cat(labels), torch.cat(dists)


def _kmeans_torch(points: Tensor, k: int, n_iter: int, seed: int, importance: Optional[Tensor] = None) -> KMeansResult:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n = points.shape[0]
    init = torch.randperm(n, generator=generator)[:k].to(points.device)  # without replacement
    centroids = points[init].clone()
    weights = None if importance is None else importance.expand_as(points)
    weighted_points = points if weights is None else weights * points
    history: List[float] = []
    labels = None
    for _ in range(n_iter):
        new_labels, dists = assign(points, centroids, importance=importance)
        history.append(float(dists.sum()))
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, weighted_points)
        nonempty = counts > 0
        if weights is None:
            centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(points.dtype)
        else:  # per coordinate: the importance-weighted mean of the cluster's points (a coordinate weighing 0 keeps its value)
            mass = torch.zeros_like(centroids).index_add_(0, labels, weights)
            update = nonempty.unsqueeze(1) & (mass > 0)
            centroids[update] = sums[update] / mass[update]
        empty = (~nonempty).nonzero().flatten()
        if empty.numel():
            # Re-seed each empty cluster on one of the points farthest from its centroid:
            # that point's error drops to zero, so the objective cannot increase.
            far = dists.topk(empty.numel()).indices
            centroids[empty] = points[far]
    labels, dists = assign(points, centroids, importance=importance)
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
