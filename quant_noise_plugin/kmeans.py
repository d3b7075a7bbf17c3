"""k-means for product quantization: faiss when installed, a vectorised torch fallback otherwise.

Every block is used (faiss subsamples to ``max_points_per_centroid * k`` points by default; we
raise that cap so it never does), the seed is fixed, and empty clusters are re-seeded.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


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


def assign(points: Tensor, centroids: Tensor, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each point and its squared distance, in chunks to bound memory."""
    c_sq = (centroids * centroids).sum(dim=1)
    labels, dists = [], []
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk]
        d = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ centroids.T + c_sq
        dist, label = d.min(dim=1)
        labels.append(label)
        dists.append(dist.clamp_min_(0.0))
    return torch.cat(labels), torch.cat(dists)


def _kmeans_torch(points: Tensor, k: int, n_iter: int, seed: int) -> KMeansResult:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n = points.shape[0]
    init = torch.randperm(n, generator=generator)[:k].to(points.device)  # without replacement
    centroids = points[init].clone()
    history: List[float] = []
    labels = None
    for _ in range(n_iter):
        new_labels, dists = assign(points, centroids)
        history.append(float(dists.sum()))
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(points.dtype)
        empty = (~nonempty).nonzero().flatten()
        if empty.numel():
            # Re-seed each empty cluster on one of the points farthest from its centroid:
            # that point's error drops to zero, so the objective cannot increase.
            far = dists.topk(empty.numel()).indices
            centroids[empty] = points[far]
    labels, dists = assign(points, centroids)
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


def kmeans(points: Tensor, k: int, n_iter: int = 20, seed: int = 0, backend: str = "auto") -> KMeansResult:
    """Cluster ``points`` (n, d) into ``k`` centroids.

    backend: "faiss", "torch" (runs on ``points``' device, CUDA included) or "auto" (faiss for
    CPU tensors when installed, torch otherwise).
    """
    n = points.shape[0]
    if k > n:
        raise ValueError(f"{k} centroids for only {n} blocks: use at most {n} centroids")
    if backend == "auto":
        backend = "faiss" if points.device.type == "cpu" and faiss_available() else "torch"
    if backend == "faiss":
        result = _kmeans_faiss(points, k, n_iter, seed)
    elif backend == "torch":
        result = _kmeans_torch(points.detach().float(), k, n_iter, seed)
    else:
        raise ValueError(f"unknown k-means backend {backend!r} (faiss, torch, auto)")
    return KMeansResult(
        result.centroids.to(points.device),
        result.assignments.to(points.device),
        result.objective,
        result.history,
    )
