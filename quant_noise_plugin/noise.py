"""Quant-Noise operators: plain torch, no fairseq.

Every operator returns a *new* tensor computed from ``weight`` (never written in place), so the
stored parameter only changes in an optimizer step and gradients flow back to it.

PQ and scalar noise also come fused: the random draw is the same call (same generator state, same
mask), and what follows it (mask, rescale, fake-quantize, select) is one ``torch.compile``d region
instead of several elementwise kernels. On a GPU those kernels are not hidden behind the matmuls;
on the CPU they are, and compiling costs seconds per weight shape, so the fused form is used on
CUDA by default (``QUANT_NOISE_FUSED``: ``auto``, ``1`` everywhere, ``0`` never).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .activations import fake_quantize_activation
from .errors import QuantNoiseError
from .scalar import fake_quantize


def check_probability(p: float, flag: str, allow_one: bool = False) -> None:
    """PQ noise rates live in [0, 1) (P=1 would divide by zero); scalar noise allows P=1 (QAT)."""
    upper_ok = p <= 1.0 if allow_one else p < 1.0
    if not (0.0 <= p and upper_ok):
        raise QuantNoiseError(f"{flag}={p}: must be in [0, 1{']' if allow_one else ')'}")


def block_mask(weight: Tensor, p: float, block_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Bernoulli(p) drop mask over blocks of ``block_size`` consecutive input weights.

    Shape ``(rows, cols // block_size)``; True means the block is dropped.
    """
    rows, cols = weight.shape[0], weight[0].numel()
    if cols % block_size:
        raise ValueError(f"block size {block_size} does not divide input dimension {cols} (weight shape {tuple(weight.shape)})")
    probs = torch.full((rows, cols // block_size), p, device=weight.device)
    return torch.bernoulli(probs, generator=generator).bool()


FUSED_SWITCH = "QUANT_NOISE_FUSED"
_COMPILED: Dict[str, Callable] = {}


def fused_for(device: torch.device) -> bool:
    """Whether noise on ``device`` runs the fused (compiled) form; see the module docstring."""
    mode = os.environ.get(FUSED_SWITCH, "auto")
    return mode == "1" or (mode == "auto" and device.type == "cuda")


def _fused(fn: Callable) -> Callable:
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn.__name__]


def _apply_block_mask(weight: Tensor, drop: Tensor, p: float) -> Tensor:
    keep = (~drop).to(weight.dtype).unsqueeze(-1) / (1.0 - p)
    return (weight.reshape(drop.shape[0], drop.shape[1], -1) * keep).reshape(weight.shape)


def pq_noise(weight: Tensor, p: float, block_size: int, generator: Optional[torch.Generator] = None,
             fused: Optional[bool] = None) -> Tensor:
    """Drop a random P fraction of weight blocks and rescale the rest by 1/(1-P).

    This is the PQ proxy of the paper: dropped blocks stand for blocks replaced by their centroid,
    kept blocks receive unbiased gradients.  E[pq_noise(w)] = w.
    """
    if p <= 0:
        return weight
    drop = block_mask(weight, p, block_size, generator)
    apply = _fused(_apply_block_mask) if (fused_for(weight.device) if fused is None else fused) else _apply_block_mask
    return apply(weight, drop, p)


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
    fused: Optional[bool] = None,
) -> Tensor:
    """Replace a random P fraction of weights by their int-``bits`` fake-quantized value.

    Straight-through estimator: the forward value is quantized where selected, the gradient is
    the identity everywhere. P=1 is plain quantization-aware training.
    """
    if p <= 0:
        return weight
    draw = torch.rand(weight.shape, device=weight.device, generator=generator) if p < 1 else None
    if fused_for(weight.device) if fused is None else fused:
        noised = _fused(_fake_quantize_selected)(weight.detach(), draw, p, bits, per_channel)
    else:
        noised = fake_quantize(weight, bits, per_channel)
        if draw is not None:
            noised = torch.where(draw < p, noised, weight.detach())
    return _StraightThrough.apply(weight, noised)


def _fake_quantize_selected(weight: Tensor, draw: Optional[Tensor], p: float, bits: int, per_channel: bool) -> Tensor:
    """``fake_quantize`` where ``draw < p``, the weight elsewhere: the same arithmetic, as one region."""
    noised = fake_quantize(weight, bits, per_channel)
    return noised if draw is None else torch.where(draw < p, noised, weight)


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
