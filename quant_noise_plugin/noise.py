"""Quant-Noise operators: plain torch, no fairseq.

Both operators return a *new* tensor computed from ``weight`` (never written in place), so the
stored parameter only changes in an optimizer step and gradients flow back to it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .activations import fake_quantize_activation
from .scalar import fake_quantize


def check_probability(p: float, flag: str, allow_one: bool = False) -> None:
    """PQ noise rates live in [0, 1) (P=1 would divide by zero); scalar noise allows P=1 (QAT)."""
    upper_ok = p <= 1.0 if allow_one else p < 1.0
    if not (0.0 <= p and upper_ok):
        raise ValueError(f"{flag}={p}: must be in [0, 1{']' if allow_one else ')'}")


def block_mask(weight: Tensor, p: float, block_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Bernoulli(p) drop mask over blocks of ``block_size`` consecutive input weights.

    Shape ``(rows, cols // block_size)``; True means the block is dropped.
    """
    rows, cols = weight.shape[0], weight[0].numel()
    if cols % block_size:
        raise ValueError(f"block size {block_size} does not divide input dimension {cols} (weight shape {tuple(weight.shape)})")
    probs = torch.full((rows, cols // block_size), p, device=weight.device)
    return torch.bernoulli(probs, generator=generator).bool()


def pq_noise(weight: Tensor, p: float, block_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Drop a random P fraction of weight blocks and rescale the rest by 1/(1-P).

    This is the PQ proxy of the paper: dropped blocks stand for blocks replaced by their centroid,
    kept blocks receive unbiased gradients.  E[pq_noise(w)] = w.
    """
    if p <= 0:
        return weight
    rows = weight.shape[0]
    drop = block_mask(weight, p, block_size, generator)
    keep = (~drop).to(weight.dtype).unsqueeze(-1) / (1.0 - p)
    blocks = weight.reshape(rows, -1, block_size)
    return (blocks * keep).reshape(weight.shape)


def centroid_noise(weight: Tensor, p: float, centroids: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Replace a random P fraction of blocks by their nearest centroid: the real PQ error, not a proxy.

    Blocks are runs of ``centroids.shape[1]`` consecutive input weights, as in :func:`pq_noise`.
    Only the selected blocks are assigned (a P fraction of the nearest-centroid search).
    Straight-through: the replacement is a detached offset, so every weight gets its gradient.
    """
    if p <= 0:
        return weight
    block_size = centroids.shape[1]
    blocks = weight.detach().reshape(-1, block_size)
    selected = torch.rand(blocks.shape[0], device=weight.device, generator=generator) < p
    index = selected.nonzero().squeeze(1)
    picked = blocks.index_select(0, index).to(centroids.dtype)
    distances = (picked * picked).sum(1, keepdim=True) - 2.0 * picked @ centroids.T + (centroids * centroids).sum(1)
    nearest = centroids.index_select(0, distances.argmin(1))
    offset = torch.zeros_like(blocks).index_copy_(0, index, (nearest - picked).to(blocks.dtype))
    return weight + offset.reshape(weight.shape)


def scalar_noise(
    weight: Tensor,
    p: float,
    bits: int,
    per_channel: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Replace a random P fraction of weights by their int-``bits`` fake-quantized value.

    Straight-through estimator: the forward value is quantized where selected, the gradient is
    the identity everywhere. P=1 is plain quantization-aware training.
    """
    if p <= 0:
        return weight
    noised = fake_quantize(weight, bits, per_channel)
    if p < 1:
        selected = torch.rand(weight.shape, device=weight.device, generator=generator) < p
        noised = torch.where(selected, noised, weight.detach())
    return _StraightThrough.apply(weight, noised)


def activation_noise(x: Tensor, p: float, scale: float, zero_point: int, bits: int = 8,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Replace a random P fraction of activations by their int-``bits`` fake-quantized value (affine,
    fixed parameters); straight-through, like ``scalar_noise`` for weights."""
    if p <= 0:
        return x
    quantized = fake_quantize_activation(x.detach(), scale, zero_point, bits)
    if p < 1:
        selected = torch.rand(x.shape, device=x.device, generator=generator) < p
        quantized = torch.where(selected, quantized, x.detach())
    return x + (quantized - x.detach())


class _StraightThrough(torch.autograd.Function):
    """Forward: the noised values; backward: the gradient reaches ``weight`` unchanged."""

    @staticmethod
    def forward(ctx, weight: Tensor, noised: Tensor) -> Tensor:
        return noised

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None
