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
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from .activations import affine_qparams
from .errors import QuantNoiseError
from .kmeans import kmeans
from .noise import activation_noise, centroid_noise, check_probability, pq_noise, scalar_noise
from .scalar import check_bits
from .weight_swap import add_input_fn, add_weight_fn, materialize_attention_weights, route_attention_through_projections

logger = logging.getLogger(__name__)

NOISED_TYPES = (nn.Linear, nn.Embedding)


@dataclass
class QuantNoiseConfig:
    pq: float = 0.0
    pq_block_size: int = 8
    pq_embeddings: Optional[float] = None  # PQ rate of embedding tables and weights tied to them; None: pq
    pq_centroids: int = 0  # 0: dropped blocks are zeroed (the paper's proxy); K: replaced by their nearest of K centroids
    pq_refit_updates: int = 100  # centroid noise: k-means refit interval, in updates
    pq_schedule: Optional[str] = None  # an iPQ schedule or plan YAML: centroid noise with each layer's own block size and K
    scalar: float = 0.0
    scalar_bits: int = 8
    scalar_per_channel: bool = False
    exclude: Optional[str] = None  # regex over module names left without noise
    activations: float = 0.0  # fraction of each noised Linear's input fake-quantized to int8 (running range)
    start_update: int = 0  # no noise before this update
    ramp_updates: int = 0  # then the rates rise linearly to their value over this many updates

    def validate(self) -> "QuantNoiseConfig":
        check_probability(self.pq, "--quant-noise-pq")
        if self.pq_embeddings is not None:
            check_probability(self.pq_embeddings, "--quant-noise-pq-embeddings")
        check_probability(self.scalar, "--quant-noise-scalar", allow_one=True)
        check_probability(self.activations, "--quant-noise-activations", allow_one=True)
        check_bits(self.scalar_bits, "--quant-noise-scalar-bits")
        if self.pq_block_size <= 0:
            raise QuantNoiseError(f"--quant-noise-pq-block-size={self.pq_block_size}: must be positive")
        for flag, value in (("--quant-noise-pq-centroids", self.pq_centroids), ("--quant-noise-start-update", self.start_update),
                            ("--quant-noise-ramp-updates", self.ramp_updates)):
            if value < 0:
                raise QuantNoiseError(f"{flag}={value}: must be >= 0")
        if self.pq_schedule and self.pq_centroids:
            raise QuantNoiseError(f"--quant-noise-pq-schedule {self.pq_schedule} and --quant-noise-pq-centroids={self.pq_centroids}: "
                                  f"give one (the schedule sets each layer's K)")
        if self.pq_refit_updates <= 0:
            raise QuantNoiseError(f"--quant-noise-pq-refit-updates={self.pq_refit_updates}: must be positive")
        if self.exclude:
            try:
                re.compile(self.exclude)
            except re.error as e:
                raise QuantNoiseError(f"--quant-noise-exclude={self.exclude!r}: invalid regex ({e})") from None
        return self

    def pq_rate(self, embedding: bool) -> float:
        return self.pq_embeddings if embedding and self.pq_embeddings is not None else self.pq

    @property
    def enabled(self) -> bool:
        return self.pq > 0 or (self.pq_embeddings or 0) > 0 or self.scalar > 0 or self.activations > 0

    def rate_scale(self, update: int) -> float:
        """Fraction of the configured rates in force at ``update`` (0 before the start, then a linear ramp)."""
        if update < self.start_update:
            return 0.0
        if self.ramp_updates <= 0:
            return 1.0
        return min(1.0, (update - self.start_update + 1) / self.ramp_updates)

    @classmethod
    def from_fairseq_cfg(cls, cfg, prefix: str = "quant_noise_") -> "QuantNoiseConfig":
        """Read the ``<prefix>*`` fields of a fairseq model/criterion config (or Namespace)."""
        def get(name, default):
            value = getattr(cfg, prefix + name, None)
            return default if value is None else value

        pq_embeddings = get("pq_embeddings", None)
        return cls(
            pq=float(get("pq", 0.0)),
            pq_block_size=int(get("pq_block_size", 8)),
            pq_embeddings=None if pq_embeddings is None else float(pq_embeddings),
            pq_centroids=int(get("pq_centroids", 0)),
            pq_refit_updates=int(get("pq_refit_updates", 100)),
            pq_schedule=get("pq_schedule", None) or None,
            scalar=float(get("scalar", 0.0)),
            scalar_bits=int(get("scalar_bits", 8)),
            scalar_per_channel=bool(get("scalar_per_channel", False)),
            exclude=get("exclude", None) or None,
            activations=float(get("activations", 0.0)),
            start_update=int(get("start_update", 0)),
            ramp_updates=int(get("ramp_updates", 0)),
        ).validate()


REFIT_KMEANS_ITERATIONS = 10


class NoiseClock:
    """The training update count that rate schedules and centroid refits follow.

    fairseq models pass the update count to every submodule that has ``set_num_updates`` (before
    each training forward); each noised layer carries this clock's method under that name.
    """

    def __init__(self) -> None:
        self.update = 0

    def set_num_updates(self, num_updates: int) -> None:
        self.update = int(num_updates)


class _Codebooks:
    """Centroid noise: the k-means centroids of each noised weight, refit every ``pq_refit_updates``.

    Kept outside the model (no state dict entry, nothing to convert); tied layers share one
    weight, hence one codebook. A resumed run refits at its first forward.
    """

    def __init__(self, cfg: QuantNoiseConfig, clock: NoiseClock) -> None:
        self.cfg, self.clock = cfg, clock
        self.fitted: Dict[int, Tuple[Tensor, int]] = {}

    def centroids(self, weight: Tensor, block_size: int, n_centroids: int) -> Tensor:
        entry = self.fitted.get(id(weight))
        if entry is None or self.clock.update - entry[1] >= self.cfg.pq_refit_updates or self.clock.update < entry[1]:
            blocks = weight.detach().float().reshape(-1, block_size)
            result = kmeans(blocks, n_centroids, n_iter=REFIT_KMEANS_ITERATIONS, seed=0)
            entry = (result.centroids, self.clock.update)
            self.fitted[id(weight)] = entry
        return entry[0]


class RunningRange:
    """The range of a layer's inputs during training: an exponential moving average of each batch's
    min and max (what activation noise quantizes with; calibration fixes the final one)."""

    MOMENTUM = 0.9

    def __init__(self) -> None:
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None

    @torch.no_grad()
    def update(self, x: Tensor) -> Tuple[float, int]:
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.MOMENTUM * self.lo + (1 - self.MOMENTUM) * lo
            self.hi = self.MOMENTUM * self.hi + (1 - self.MOMENTUM) * hi
        return affine_qparams(self.lo, self.hi)


def _activation_noise_fn(module: nn.Module, cfg: QuantNoiseConfig, clock: NoiseClock):
    observed = RunningRange()

    def noised(x: Tensor) -> Optional[Tensor]:
        if not module.training:
            return None
        scale = cfg.rate_scale(clock.update)
        if scale <= 0:
            return None
        return activation_noise(x, cfg.activations * scale, *observed.update(x))

    return noised


def _noise_fn(module: nn.Module, cfg: QuantNoiseConfig, pq_rate: float, clock: NoiseClock, codebooks: _Codebooks,
              block_size: int, n_centroids: int):
    def noised(weight: Optional[Tensor]) -> Optional[Tensor]:
        if not module.training or weight is None:
            return None
        scale = cfg.rate_scale(clock.update)
        if scale <= 0:
            return None
        if pq_rate > 0 and n_centroids:
            weight = centroid_noise(weight, pq_rate * scale, codebooks.centroids(weight, block_size, n_centroids))
        elif pq_rate > 0:
            weight = pq_noise(weight, pq_rate * scale, block_size)
        if cfg.scalar > 0:
            weight = scalar_noise(weight, cfg.scalar * scale, cfg.scalar_bits, cfg.scalar_per_channel)
        return weight

    return noised


def schedule_settings(model: nn.Module, path: str) -> Dict[str, Tuple[int, int]]:
    """(block size, K) of every module an iPQ schedule (or `quant-noise plan`'s YAML) quantizes, tied names included."""
    from .schedule import load_schedule, plan_schedule

    plans = plan_schedule(load_schedule(path), model, path)
    return {name: (p.block_size, p.n_centroids) for stage in plans for p in stage.layers for name in p.names}


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


def embedding_weight_ids(model: nn.Module) -> Set[int]:
    """Weights of embedding tables, which a tied output projection (the softmax) shares."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not None}


def noise_rates(model: nn.Module, cfg: QuantNoiseConfig) -> Dict[str, float]:
    """PQ rate of each noised module (embedding tables and the layers tied to them may differ)."""
    modules = dict(model.named_modules())
    embeddings = embedding_weight_ids(model)
    return {name: cfg.pq_rate(id(modules[name].weight) in embeddings) for name in noise_targets(model, cfg)}


def apply_quant_noise_(model: nn.Module, cfg: QuantNoiseConfig, within: str = "") -> List[str]:
    """Attach Quant-Noise to ``model`` in place; returns the names of the noised modules.

    ``within``: only the modules under this name (e.g. a classification head added after the model
    was built); ``--quant-noise-exclude`` still matches names from the model's root.
    Raises a one-line ValueError naming the layer when the PQ block size does not divide a noised
    layer's input dimension, or a layer has fewer blocks than ``pq_centroids``.
    """
    cfg.validate()
    remove_fairseq_builtin_noise_(model.get_submodule(within) if within else model)
    if not cfg.enabled:
        return []
    rates = {name: rate for name, rate in noise_rates(model, cfg).items() if not within or name == within or name.startswith(within + ".")}
    settings = {name: (cfg.pq_block_size, cfg.pq_centroids) for name in rates}
    if cfg.pq_schedule:  # each layer the schedule quantizes: its block size and K; the others: no PQ noise
        planned = schedule_settings(model, cfg.pq_schedule)
        settings = {name: planned.get(name, (cfg.pq_block_size, 0)) for name in rates}
        rates = {name: rate if name in planned else 0.0 for name, rate in rates.items()}
    names = [name for name, rate in rates.items() if rate > 0 or cfg.scalar > 0]  # weight noise
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        cols = weight.shape[-1]
        block_size, n_centroids = settings[name]
        if rates[name] > 0 and cols % block_size:
            raise QuantNoiseError(
                f"--quant-noise-pq-block-size={block_size} does not divide the input dimension of "
                f"layer {name} (weight shape {tuple(weight.shape)}); pick a divisor or exclude it "
                f"with --quant-noise-exclude"
            )
        if rates[name] > 0 and n_centroids > weight.numel() // block_size:
            raise QuantNoiseError(
                f"--quant-noise-pq-centroids={n_centroids}: layer {name} (weight shape {tuple(weight.shape)}) has only "
                f"{weight.numel() // block_size} blocks of {block_size}"
            )
    clock = NoiseClock()
    codebooks = _Codebooks(cfg, clock)
    for name in names:
        module = modules[name]
        add_weight_fn(module, _noise_fn(module, cfg, rates[name], clock, codebooks, *settings[name]))
        module.set_num_updates = clock.set_num_updates
    noised_inputs = [name for name in rates if isinstance(modules[name], nn.Linear)] if cfg.activations > 0 else []
    for name in noised_inputs:
        add_input_fn(modules[name], _activation_noise_fn(modules[name], cfg, clock))
        modules[name].set_num_updates = clock.set_num_updates
    materialize_attention_weights(model)
    route_attention_through_projections(model, noised_inputs)
    model.__dict__["quant_noise_clock"] = clock
    extras = [f"embeddings pq={cfg.pq_embeddings}"] if cfg.pq_embeddings is not None else []
    if cfg.pq_centroids:
        extras.append(f"centroid noise K={cfg.pq_centroids}, refit every {cfg.pq_refit_updates} updates")
    if cfg.pq_schedule:
        planned = sorted({settings[n] for n in names if rates[n] > 0})
        extras.append(f"centroid noise per layer from {cfg.pq_schedule} on {sum(rates[n] > 0 for n in names)} layers "
                      f"(block x K: {', '.join(f'{b}x{k}' for b, k in planned)}), refit every {cfg.pq_refit_updates} updates")
    if cfg.activations:
        extras.append(f"activations {cfg.activations} (int8) on {len(noised_inputs)} Linear inputs")
    if cfg.start_update or cfg.ramp_updates:
        extras.append(f"from update {cfg.start_update}, ramp {cfg.ramp_updates} updates")
    logger.info(
        "quant-noise: pq=%s (block %d), scalar=%s (int%d) on %d layers%s",
        cfg.pq, cfg.pq_block_size, cfg.scalar, cfg.scalar_bits, len(names), "".join(f"; {e}" for e in extras),
    )
    return names
