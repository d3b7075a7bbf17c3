"""Attach Quant-Noise to a model: one verb, ``apply_quant_noise_(model, QuantNoiseConfig(...))``.

Every nn.Linear / nn.Embedding (subclasses included) whose name is not excluded computes, in
training mode, with a noised *copy* of its weight (see weight_swap.py); eval mode sees the plain
weight. fairseq's own Quant-Noise (in-place pre-hooks, scalar IntLinear/IntEmbedding swaps) is
removed first, so noise is applied exactly once.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import List, Optional

from torch import Tensor, nn

from .noise import check_probability, pq_noise, scalar_noise
from .scalar import check_bits
from .weight_swap import add_weight_fn, materialize_attention_weights

logger = logging.getLogger(__name__)

NOISED_TYPES = (nn.Linear, nn.Embedding)


@dataclass
class QuantNoiseConfig:
    pq: float = 0.0
    pq_block_size: int = 8
    scalar: float = 0.0
    scalar_bits: int = 8
    scalar_per_channel: bool = False
    exclude: Optional[str] = None  # regex over module names left without noise

    def validate(self) -> "QuantNoiseConfig":
        check_probability(self.pq, "--quant-noise-pq")
        check_probability(self.scalar, "--quant-noise-scalar", allow_one=True)
        check_bits(self.scalar_bits, "--quant-noise-scalar-bits")
        if self.pq_block_size <= 0:
            raise ValueError(f"--quant-noise-pq-block-size={self.pq_block_size}: must be positive")
        if self.exclude:
            try:
                re.compile(self.exclude)
            except re.error as e:
                raise ValueError(f"--quant-noise-exclude={self.exclude!r}: invalid regex ({e})") from None
        return self

    @property
    def enabled(self) -> bool:
        return self.pq > 0 or self.scalar > 0

    @classmethod
    def from_fairseq_cfg(cls, cfg, prefix: str = "quant_noise_") -> "QuantNoiseConfig":
        """Read the ``<prefix>*`` fields of a fairseq model/criterion config (or Namespace)."""
        def get(name, default):
            value = getattr(cfg, prefix + name[len("quant_noise_"):], None)
            return default if value is None else value

        return cls(
            pq=float(get("quant_noise_pq", 0.0)),
            pq_block_size=int(get("quant_noise_pq_block_size", 8)),
            scalar=float(get("quant_noise_scalar", 0.0)),
            scalar_bits=int(get("quant_noise_scalar_bits", 8)),
            scalar_per_channel=bool(get("quant_noise_scalar_per_channel", False)),
            exclude=get("quant_noise_exclude", None) or None,
        ).validate()


def _noise_fn(module: nn.Module, cfg: QuantNoiseConfig):
    def noised(weight: Optional[Tensor]) -> Optional[Tensor]:
        if not module.training or weight is None:
            return None
        if cfg.pq > 0:
            weight = pq_noise(weight, cfg.pq, cfg.pq_block_size)
        if cfg.scalar > 0:
            weight = scalar_noise(weight, cfg.scalar, cfg.scalar_bits, cfg.scalar_per_channel)
        return weight

    return noised


def remove_fairseq_builtin_noise_(model: nn.Module) -> int:
    """Undo fairseq's own Quant-Noise so it cannot fire on top of ours.

    Removes ``fairseq.modules.quant_noise`` forward pre-hooks (they overwrite ``weight.data`` in
    place) and swaps fairseq's scalar ``IntLinear``/``IntEmbedding`` back to plain modules that
    share the same Parameters (so optimizer references stay valid). Returns how many were undone.
    """
    undone = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__module__", "") == "fairseq.modules.quant_noise":
                del module._forward_pre_hooks[key]
                undone += 1
        for child_name, child in list(module.named_children()):
            kind = type(child).__name__
            if not type(child).__module__.startswith("fairseq.modules.quantization.scalar"):
                continue
            if kind == "IntLinear":
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
            elif kind == "IntEmbedding":
                plain = nn.Embedding(child.num_embeddings, child.embedding_dim, padding_idx=child.padding_idx, device="meta")
                plain.weight = child.weight
            else:
                continue
            plain.train(child.training)
            setattr(module, child_name, plain)
            undone += 1
    if undone:
        logger.info("quant-noise: removed %d fairseq built-in quant-noise hooks/modules; the plugin applies the noise", undone)
    return undone


def noise_targets(model: nn.Module, cfg: QuantNoiseConfig) -> List[str]:
    """Names of the modules Quant-Noise applies to."""
    exclude = re.compile(cfg.exclude) if cfg.exclude else None
    names, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, NOISED_TYPES) or getattr(module, "weight", None) is None:
            continue
        if id(module) in seen or (exclude is not None and exclude.search(name)):
            continue
        seen.add(id(module))
        names.append(name)
    return names


def apply_quant_noise_(model: nn.Module, cfg: QuantNoiseConfig) -> List[str]:
    """Attach Quant-Noise to ``model`` in place; returns the names of the noised modules.

    Raises a one-line ValueError naming the layer when the PQ block size does not divide a noised
    layer's input dimension.
    """
    cfg.validate()
    remove_fairseq_builtin_noise_(model)
    if not cfg.enabled:
        return []
    names = noise_targets(model, cfg)
    modules = dict(model.named_modules())
    if cfg.pq > 0:
        for name in names:
            cols = modules[name].weight.shape[-1]
            if cols % cfg.pq_block_size:
                raise ValueError(
                    f"--quant-noise-pq-block-size={cfg.pq_block_size} does not divide the input dimension of "
                    f"layer {name} (weight shape {tuple(modules[name].weight.shape)}); pick a divisor or exclude it "
                    f"with --quant-noise-exclude"
                )
    for name in names:
        add_weight_fn(modules[name], _noise_fn(modules[name], cfg))
    materialize_attention_weights(model)
    logger.info("quant-noise: pq=%s (block %d), scalar=%s (int%d) on %d layers", cfg.pq, cfg.pq_block_size, cfg.scalar, cfg.scalar_bits, len(names))
    return names
