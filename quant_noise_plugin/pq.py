"""Product-quantized weights: plain torch, no fairseq.

A weight of shape (rows, cols) is cut into blocks of ``block_size`` consecutive input weights
(the same blocks Quant-Noise drops); each block is replaced by one of ``n_centroids`` centroids
shared by the whole layer.  Stored: the centroids (trainable) and one code per block (fixed, in the
smallest integer type).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .bitpack import bits_for, pack_bits, smallest_int_dtype, unpack_bits
from .gptq import quantize_pq_to_output
from .kmeans import assign, kmeans
from .scalar import dequantize, quantize


COMPACT_CODES = "codes_bitstream"  # the codes bit-packed in memory (PQCodebook.compact), never saved


class _GatherWithMeanGrad(torch.autograd.Function):
    """centroids[codes] whose backward averages (not sums) the gradients of each centroid's blocks.

    The mean keeps the centroid step size independent of how many blocks share it, identically
    for every layer type (the reference sums for Linear/Embedding but averages for Conv).
    """

    @staticmethod
    def forward(ctx, centroids: Tensor, codes: Tensor) -> Tensor:
        ctx.save_for_backward(codes)
        ctx.n_centroids = centroids.shape[0]
        return centroids[codes]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (codes,) = ctx.saved_tensors
        grad_sum = grad.new_zeros(ctx.n_centroids, grad.shape[1]).index_add_(0, codes, grad)
        counts = torch.bincount(codes, minlength=ctx.n_centroids).clamp_min(1).to(grad.dtype)
        return grad_sum / counts.unsqueeze(1), None


def check_pq_shape(name: str, shape: Sequence[int], block_size: int, n_centroids: int) -> None:
    """One-line errors naming the layer when a block size or K cannot work for it."""
    cols = shape[-1]
    if block_size <= 0 or cols % block_size:
        raise ValueError(f"layer {name} (shape {tuple(shape)}): block_size {block_size} does not divide its input dimension {cols}")
    n_blocks = math.prod(shape) // block_size
    if not 1 <= n_centroids <= n_blocks:
        raise ValueError(f"layer {name} (shape {tuple(shape)}): n_centroids {n_centroids} but only {n_blocks} blocks of size {block_size}")


class PQCodebook(nn.Module):
    """The PQ form of one weight tensor; ``forward()`` returns the dense weight it stands for."""

    def __init__(self, shape: Sequence[int], block_size: int, n_centroids: int):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.block_size = int(block_size)
        self.n_centroids = int(n_centroids)
        n_blocks = math.prod(self.shape) // self.block_size
        self.centroids = nn.Parameter(torch.zeros(self.n_centroids, self.block_size))
        self.register_buffer("codes", torch.zeros(n_blocks, dtype=smallest_int_dtype(self.n_centroids)))
        # Persistent so that a checkpoint says which layers are already quantized (resume, eval).
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def n_blocks(self) -> int:
        return math.prod(self.shape) // self.block_size

    @torch.no_grad()
    def compact(self) -> None:
        """Keep the codes bit-packed in memory, as in a packed file (inference from the codes, QUANT_NOISE_INFERENCE=codes:
        4-bit codes take half their uint8 buffer). ``codes`` still reads as the codes (unpacked for that use), a state
        dict still holds them, and fitting or loading expands them again. 8- and 16-bit codes are already that size."""
        if self.code_bits % 8 == 0 or COMPACT_CODES in self._buffers:
            return
        stream = pack_bits(self._buffers["codes"], self.code_bits)
        self.register_buffer(COMPACT_CODES, torch.cat([stream, stream.new_zeros(2)]), persistent=False)  # 2 bytes: 24-bit reads
        del self._buffers["codes"]

    @property
    def compacted(self) -> bool:
        return COMPACT_CODES in self._buffers

    def _expand(self) -> None:
        if self.compacted:
            codes = self.codes
            del self._buffers[COMPACT_CODES]
            self.register_buffer("codes", codes)

    def __getattr__(self, name: str):
        if name == "codes" and COMPACT_CODES in self.__dict__.get("_buffers", {}):
            stream = self._buffers[COMPACT_CODES]
            return unpack_bits(stream, self.code_bits, self.n_blocks).to(smallest_int_dtype(self.n_centroids))
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.compacted:
            destination[prefix + "codes"] = self.codes

    def blocks_of(self, weight: Tensor) -> Tensor:
        return weight.detach().reshape(-1, self.block_size)

    @torch.no_grad()
    def fit(self, weight: Tensor, n_iter: int = 20, seed: int = 0, backend: str = "auto",
            importance: Optional[Tensor] = None, hessian: Optional[Tensor] = None,
            row_weights: Optional[Tensor] = None) -> float:
        """k-means on the blocks of ``weight``; returns the final objective. ``importance`` (broadcastable to the
        weight's shape, e.g. calibration.InputMoments.importance()) weighs each weight's squared error.

        ``hessian`` (the input second moments of a 2-D weight's Linear use, (cols, cols)): the k-means then only
        starts the centroids; codes by error feedback and centroids by least squares on the output error follow
        (gptq.quantize_pq_to_output, with ``row_weights`` per row), and the relative output error is returned."""
        self._expand()
        blocks = None if importance is None else self.blocks_of(importance.expand(weight.shape))
        result = kmeans(self.blocks_of(weight).float(), self.n_centroids, n_iter=n_iter, seed=seed, backend=backend,
                        importance=blocks)
        centroids, codes, objective = result.centroids, result.assignments, result.objective
        if hessian is not None:
            w = weight.detach().float().reshape(self.shape[0], -1)
            centroids, codes, objective = quantize_pq_to_output(w, hessian.to(w.device), centroids, row_weights=row_weights)
        self.centroids.copy_(centroids)
        self.codes.copy_(codes.to(self.codes.dtype))
        self.fitted.fill_(True)
        if "target" in self._buffers:
            self.target.copy_(weight.detach().reshape(self.shape))
        return objective

    def keep_target(self) -> None:
        """Codes that move (see ``reassign``): keep the weight the codes were fitted to, in training checkpoints
        (a resumed run reassigns towards the same weight; packed files never hold it)."""
        if "target" not in self._buffers:
            self.register_buffer("target", torch.zeros(self.shape))

    @torch.no_grad()
    def reassign(self, importance: Optional[Tensor] = None) -> tuple[float, float, float]:
        """Move every block's code to the centroid nearest its target weight, as the centroids are now (after
        finetuning moved them): one assignment step of k-means with the centroids the task's loss chose.
        Returns (fraction of blocks whose code changed, weighted error before, after)."""
        if "target" not in self._buffers:
            raise RuntimeError("reassign needs keep_target() before fit()")
        self._expand()
        points = self.blocks_of(self.target).float()
        weights = None if importance is None else self.blocks_of(importance.expand(self.shape)).float()
        centroids = self.centroids.detach().float()
        before = points - centroids[self.codes.long()]
        before = float(((before * before) if weights is None else weights * before * before).sum())
        labels, dists = assign(points, centroids, importance=weights)
        moved = float((labels != self.codes.long()).float().mean())
        self.codes.copy_(labels.to(self.codes.dtype))
        return moved, before, float(dists.sum())

    def forward(self) -> Tensor:
        codes = self.codes.long()
        return _GatherWithMeanGrad.apply(self.centroids, codes).reshape(self.shape)

    @property
    def code_bits(self) -> int:
        return bits_for(self.n_centroids)

    @torch.no_grad()
    def packed_state(self, float_dtype: torch.dtype = torch.float16, centroid_bits: Optional[int] = None,
                     symmetric: bool = False) -> Dict[str, Tensor]:
        """The on-disk form: codes bit-packed to ``code_bits`` (8-bit codes stay a uint8 tensor), centroids
        in ``float_dtype`` or as int ``centroid_bits`` codes with one scale and zero point (symmetric:
        what int8 kernels take, see int8_linear.py)."""
        state: Dict[str, Tensor] = {"fitted": self.fitted}
        state.update({"codes": self.codes} if self.code_bits == 8 else {"codes_packed": pack_bits(self.codes, self.code_bits)})
        if centroid_bits:
            codes, scale, zero_point = quantize(self.centroids, centroid_bits, per_channel=False, symmetric=symmetric)
            state.update(centroids_codes=codes, centroids_scale=scale, centroids_zero_point=zero_point)
        else:
            state["centroids"] = self.centroids.detach().to(float_dtype)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Read the packed form too (see ``packed_state``); int centroid codes are kept for int8 kernels.

        A dense checkpoint has no codebook keys at all (e.g. the trained model an iPQ run starts
        from): the codebook then stays as it is, not fitted yet.
        """
        self._expand()
        if prefix + "codes_packed" in state_dict:
            packed = state_dict.pop(prefix + "codes_packed")
            state_dict[prefix + "codes"] = unpack_bits(packed, self.code_bits, self.codes.numel()).to(self.codes.dtype)
        self.centroid_codes = None
        if prefix + "centroids_codes" in state_dict:
            codes = state_dict.pop(prefix + "centroids_codes")
            scale, zero_point = state_dict.pop(prefix + "centroids_scale"), state_dict.pop(prefix + "centroids_zero_point")
            state_dict[prefix + "centroids"] = dequantize(codes, scale, zero_point)
            self.centroid_codes = (codes, scale, zero_point)  # what the centroids are, exactly, in integers
        if "target" not in self._buffers:
            state_dict.pop(prefix + "target", None)  # a training checkpoint's, read for inference: not part of the model
        elif prefix + "target" not in state_dict and prefix + "centroids" in state_dict and prefix + "codes" in state_dict:
            # a checkpoint fitted without moving codes: the target is what the codes decode to (reassigning keeps them)
            decoded = state_dict[prefix + "centroids"].float()[state_dict[prefix + "codes"].long()]
            state_dict[prefix + "target"] = decoded.reshape(self.shape)
        if prefix + "fitted" not in state_dict:
            for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
                state_dict.setdefault(prefix + name, tensor.detach())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block_size={self.block_size}, n_centroids={self.n_centroids}, fitted={bool(self.fitted)}"
