"""The planner's menus: every weight's ways to be stored (PQ block size x centroid count, or left out of PQ: int codes
at pack time under the schedule's ``final_scalar_bits``, else fp16), each with its bytes as the packed file stores them
(sizes.py), and the weight as each setting would store it."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..bitpack import bits_for
from ..errors import QuantNoiseError
from ..kmeans import assign
from ..pq import PQCodebook
from ..providers import PROVIDER_CHILDREN
from ..scalar import ScalarCodes
from ..schedule import layer_kind, quantizable_weights
from ..sizes import pq_bytes, scalar_bytes

logger = logging.getLogger(__name__)

BLOCK_SIZES = (4, 8, 16)


CENTROID_COUNTS = (4, 8, 16, 32, 64, 128, 256)


SAMPLE_WEIGHTS = 1 << 18  # the proxy's errors are read on this many weights of each layer (whole rows), at most


FIT_WEIGHTS = 1 << 16  # fisher (large models): its k-means fits on this many (>= 32 blocks per centroid), the rest held out


class BudgetError(QuantNoiseError):
    """A budget no plan can meet, or a model the planner cannot plan: the message says which and why."""


@dataclass(frozen=True)
class Setting:
    """One way to store a weight: PQ with (block_size, n_centroids), or left out of PQ (both None)."""

    block_size: Optional[int] = None
    n_centroids: Optional[int] = None

    @property
    def is_pq(self) -> bool:
        return self.block_size is not None

    def label(self, scalar_bits: Optional[int]) -> str:
        if self.is_pq:
            return f"bs {self.block_size} K {self.n_centroids}"
        return f"int{scalar_bits}" if scalar_bits else "fp16"

    def bits_per_weight(self, scalar_bits: Optional[int]) -> float:
        if self.is_pq:
            return bits_for(self.n_centroids) / self.block_size
        return float(scalar_bits or 16)


@dataclass
class Choice:
    setting: Setting
    bytes: int
    error: float  # activation-weighted squared error of the setting, on the sampled rows
    rise: float = 0.0  # calibration loss rise (nats per token): measured, or the proxy's estimate


@dataclass
class WeightMenu:
    """The settings one weight (and every module tied to it) may get."""

    names: List[str]
    kind: str
    shape: List[int]
    choices: List[Choice]
    reference: Setting  # where the rise was measured (the proxy's anchor)
    measured_rise: float = 0.0
    coarse: Optional[Setting] = None  # a second anchor (--anchors 2): the coarsest PQ setting, its rise measured too
    coarse_rise: float = 0.0

    @property
    def name(self) -> str:
        return self.names[0]


def parse_size(text: str, flag: str = "--target-size") -> int:
    """'200KB', '0.2MB', '1.5MiB', '200000' -> bytes (KB = 1000 bytes, KiB = 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?[bB]?|[bB])?\s*", str(text))
    if not match:
        raise BudgetError(f"{flag} {text}: a size such as 200KB, 0.2MB, 1.5MiB or 200000 (bytes)")
    value, unit = float(match.group(1)), (match.group(2) or "b").lower().rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}[unit]
    return int(round(value * scale))


def settings_for(shape: Sequence[int], block_sizes: Sequence[int] = BLOCK_SIZES,
                 centroid_counts: Sequence[int] = CENTROID_COUNTS) -> List[Setting]:
    """The PQ settings that fit a weight (block size dividing its input dimension, K at most its blocks), then
    leaving it out of PQ."""
    n = math.prod(shape)
    out = [Setting(b, k) for b in block_sizes if shape[-1] % b == 0 for k in centroid_counts if k <= n // b]
    return out + [Setting()]


def setting_bytes(shape: Sequence[int], setting: Setting, scalar_bits: Optional[int]) -> int:
    """Bytes of the weight in the packed file under ``setting`` (int codes per row, as ``quant-noise pack`` stores them)."""
    if setting.is_pq:
        return pq_bytes(shape, setting.block_size, setting.n_centroids, scalar_bits)
    if scalar_bits:
        return scalar_bytes(shape, scalar_bits, shape[0])
    return 2 * math.prod(shape)


@torch.no_grad()
def quantized(weight: Tensor, setting: Setting, scalar_bits: Optional[int], importance: Optional[Tensor] = None,
              n_iter: int = 10, seed: int = 0, backend: str = "auto", fit_rows: Optional[int] = None) -> Tensor:
    """``weight`` as the setting would store it (PQ: the activations objective's k-means when ``importance`` is given).
    ``fit_rows``: the codebook is fitted on the first rows only and every block then coded by its nearest centroid
    (the proxy's speed on large layers: a k-means on a few rows, one assignment pass on the rest)."""
    weight = weight.detach().float()
    if setting.is_pq:
        rows = weight.shape[0] if fit_rows is None else max(1, min(weight.shape[0], fit_rows))
        part = None if importance is None else importance.expand(weight.shape)[:rows]
        codebook = PQCodebook((rows, *weight.shape[1:]), setting.block_size, setting.n_centroids)
        codebook.fit(weight[:rows], n_iter=n_iter, seed=seed, backend=backend, importance=part)
        if rows == weight.shape[0]:
            return codebook().detach()
        blocks = weight.reshape(-1, setting.block_size)
        weights = None if importance is None else importance.expand(weight.shape).reshape(-1, setting.block_size)
        centroids = codebook.centroids.detach().float()
        return centroids[assign(blocks, centroids, importance=weights)[0]].reshape(weight.shape)
    if scalar_bits:
        return ScalarCodes(weight.shape, scalar_bits).fit(weight)().reshape(weight.shape)
    return weight.half().float()


def fit_rows_for(shape: Sequence[int], setting: Setting) -> Optional[int]:
    """How many (random) rows of a layer the ``fisher`` proxy's k-means fits on: FIT_WEIGHTS, or 32 blocks per
    centroid. (The ``measured`` proxy fits on the whole sample: on a small model that is the same work, and its held-out
    errors of large K on a few rows of a frequency-weighted embedding read high enough to change the demo's plan.)"""
    if not setting.is_pq:
        return None
    return math.ceil(max(FIT_WEIGHTS, 32 * setting.n_centroids * setting.block_size) / max(1, math.prod(shape[1:])))


def weight_menus(model: nn.Module, scalar_bits: Optional[int] = 8, block_sizes: Sequence[int] = BLOCK_SIZES,
                 centroid_counts: Sequence[int] = CENTROID_COUNTS) -> List[WeightMenu]:
    """Every quantizable weight's settings and their bytes (errors and rises not measured yet)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    menus = []
    for names in quantizable_weights(model).values():
        module = modules[names[0]]
        if any(child in module._modules for child in PROVIDER_CHILDREN):
            raise BudgetError(f"layer {names[0]} is already quantized: plan from the dense (or Quant-Noise trained) checkpoint")
        shape = list(module._parameters["weight"].shape)
        settings = settings_for(shape, block_sizes, centroid_counts)
        if len(settings) == 1:
            logger.info("%s %s: no PQ setting fits (block sizes %s): left out of PQ", names[0], shape, list(block_sizes))
        menus.append(WeightMenu(list(names), layer_kind(module), shape,
                                [Choice(s, setting_bytes(shape, s, scalar_bits), 0.0) for s in settings], Setting()))
    return menus
