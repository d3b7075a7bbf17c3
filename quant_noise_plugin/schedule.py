"""The iPQ schedule: an ordered list of stages read from YAML into a typed omegaconf config.

Each stage names its layers with a regex over module names (full match), sets block size and
number of centroids per layer type (Linear, Embedding), and how many updates to finetune after
quantizing them.  ``plan_schedule`` checks the schedule against a real model and says, in one
line naming the culprit, what is wrong before any training starts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from .bitpack import bits_for
from .errors import QuantNoiseError
from .pq import check_pq_shape

LAYER_TYPES = {"Linear": nn.Linear, "Embedding": nn.Embedding}
# What a stage's k-means minimizes: the weights' squared error (the paper's), or that error weighted per
# coordinate by the layer's calibration input statistics (calibration.InputMoments: an estimate of the output error),
# or the output error itself: that weighted k-means, then codes by error feedback and centroids by least squares on
# the full input second moments (gptq.quantize_pq_to_output; a weight no Linear uses falls back to activations)
OBJECTIVES = ("weights", "activations", "output")


class ScheduleError(QuantNoiseError):
    """A schedule that cannot run: the message names the file, key, stage or layer."""


@dataclass
class LayerTypeSettings:
    block_size: int = 8
    n_centroids: int = 256


@dataclass
class LayerOverride:
    """Settings of some of a stage's layers (a plan's per-layer choices, ``quant-noise plan``)."""

    layers: str = MISSING  # regex over module names, full match; must match at least one layer of the stage
    block_size: Optional[int] = None  # None: the stage's
    n_centroids: Optional[int] = None


@dataclass
class StageConfig:
    name: str = MISSING
    layers: str = MISSING  # regex over module names, full match
    updates: int = MISSING  # finetuning updates after quantizing this stage's layers
    block_size: Dict[str, int] = field(default_factory=dict)  # per layer type, overrides defaults
    n_centroids: Dict[str, int] = field(default_factory=dict)
    objective: Optional[str] = None  # one of OBJECTIVES; None: the schedule's
    # every N updates of the stage's finetuning, each block of its layers moves to the centroid nearest the weight it
    # was fitted to (the centroids as finetuning moved them); 0: codes frozen once fitted (the paper's)
    reassign_every: int = 0
    # settings for some of the stage's layers, over the stage's own; the first entry that matches a layer applies
    per_layer: List[LayerOverride] = field(default_factory=list)


@dataclass
class PrunedStack:
    """The model a schedule was planned for had this stack pruned (``quant-noise plan`` on a LayerDrop model)."""

    stack: str = MISSING  # module name, e.g. decoder.layers
    kept: List[int] = MISSING  # the layers `quant-noise prune --keep` keeps, of the trained model's
    of: int = MISSING  # the trained model's depth


@dataclass
class ScheduleConfig:
    stages: List[StageConfig] = MISSING
    defaults: Dict[str, LayerTypeSettings] = field(
        default_factory=lambda: {"Linear": LayerTypeSettings(), "Embedding": LayerTypeSettings()}
    )
    kmeans_iterations: int = 20
    seed: int = 0
    objective: str = "weights"  # each stage's k-means objective unless the stage sets its own (OBJECTIVES)
    # After the last stage, store the layers left in float and the centroids as int8 (or int4):
    # the paper's "iPQ + int8". Applied by `quant-noise pack` (None: keep them fp16).
    final_scalar_bits: Optional[int] = None
    # planned for the model with only these layers kept: iPQ runs on `quant-noise prune`'s output (checked on load)
    pruned: Optional[PrunedStack] = None

    @property
    def total_updates(self) -> int:
        return sum(s.updates for s in self.stages)

    @property
    def largest_centroids(self) -> int:
        """The largest K anywhere in the schedule (defaults, stages, per-layer entries)."""
        counts = [d.n_centroids for d in self.defaults.values()]
        for stage in self.stages:
            counts += list(stage.n_centroids.values()) + [o.n_centroids for o in stage.per_layer if o.n_centroids]
        return max(counts)


def _typed(node, schema, where: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        reason = str(e).splitlines()[0]
        raise ScheduleError(f"{where}{': key ' + key if key else ''}: {reason}") from None


def schedule_from_dict(data, source: str = "<schedule>") -> ScheduleConfig:
    """Type-check a parsed schedule; each stage is checked on its own so errors name it."""
    data = OmegaConf.create(data) if not OmegaConf.is_config(data) else data
    if not isinstance(data, DictConfig):
        raise ScheduleError(f"{source}: a schedule is a mapping with a 'stages' list")
    stages = data.get("stages")
    if not isinstance(stages, ListConfig):
        raise ScheduleError(f"{source}: key stages: missing, or not a list of stages")
    defaults = data.get("defaults")
    if defaults is not None and not isinstance(defaults, DictConfig):
        raise ScheduleError(f"{source}: key defaults: a mapping of layer type to settings, e.g. Linear: {{block_size: 8, n_centroids: 256}}")
    for kind, settings in (defaults or {}).items():
        if not isinstance(settings, DictConfig):
            raise ScheduleError(f"{source}: key defaults.{kind}: a mapping of settings, e.g. {{block_size: 8, n_centroids: 256}}")
    rest = OmegaConf.create({k: v for k, v in data.items() if k != "stages"})
    schedule = _typed(OmegaConf.merge(rest, {"stages": []}), ScheduleConfig, source)
    schedule.stages = []
    for i, stage in enumerate(stages):
        entries = stage.get("per_layer") if isinstance(stage, DictConfig) else None
        if entries is not None and not isinstance(entries, ListConfig):
            raise ScheduleError(f"{source}: stage {i}: key per_layer: a list of {{layers: REGEX, block_size: N, n_centroids: K}}")
        rest = OmegaConf.create({k: v for k, v in stage.items() if k != "per_layer"}) if entries is not None else stage
        typed = _typed(rest, StageConfig, f"{source}: stage {i}")
        typed.per_layer = [_typed(entry, LayerOverride, f"{source}: stage {i}: key per_layer.{j}") for j, entry in enumerate(entries or [])]
        schedule.stages.append(typed)
    validate_schedule(schedule, source)
    return schedule


def load_schedule(path: str | Path) -> ScheduleConfig:
    """Read and type-check a schedule YAML; unknown keys and wrong types are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"{path}: schedule file not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ScheduleError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return schedule_from_dict(raw, str(path))


def schedule_to_dict(schedule: ScheduleConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schedule))


def validate_schedule(schedule: ScheduleConfig, source: str) -> None:
    if not schedule.stages:
        raise ScheduleError(f"{source}: key stages: the schedule has no stage")
    for kind in schedule.defaults:
        if kind not in LAYER_TYPES:
            raise ScheduleError(f"{source}: key defaults.{kind}: unknown layer type (use {', '.join(LAYER_TYPES)})")
    if schedule.objective not in OBJECTIVES:
        raise ScheduleError(f"{source}: key objective: {schedule.objective!r} (use {', '.join(OBJECTIVES)})")
    if schedule.kmeans_iterations <= 0:
        raise ScheduleError(f"{source}: key kmeans_iterations: must be > 0, got {schedule.kmeans_iterations}")
    if schedule.final_scalar_bits not in (None, 4, 8):
        raise ScheduleError(f"{source}: key final_scalar_bits: {schedule.final_scalar_bits} (use 4, 8 or null)")
    names = set()
    for i, stage in enumerate(schedule.stages):
        where = f"{source}: stage {i} ({stage.name})"
        if stage.name in names:
            raise ScheduleError(f"{where}: duplicate stage name")
        names.add(stage.name)
        if stage.updates <= 0:
            raise ScheduleError(f"{where}: key updates: must be > 0, got {stage.updates}")
        if not 0 <= stage.reassign_every < stage.updates:
            raise ScheduleError(f"{where}: key reassign_every: must be >= 0 (0: codes frozen) and below the stage's {stage.updates} updates, got {stage.reassign_every}")
        if stage.objective is not None and stage.objective not in OBJECTIVES:
            raise ScheduleError(f"{where}: key objective: {stage.objective!r} (use {', '.join(OBJECTIVES)})")
        try:
            re.compile(stage.layers)
        except re.error as e:
            raise ScheduleError(f"{where}: key layers: invalid regex {stage.layers!r} ({e})") from None
        for key in ("block_size", "n_centroids"):
            for kind, value in getattr(stage, key).items():
                if kind not in LAYER_TYPES:
                    raise ScheduleError(f"{where}: key {key}.{kind}: unknown layer type (use {', '.join(LAYER_TYPES)})")
                if value <= 0:
                    raise ScheduleError(f"{where}: key {key}.{kind}: must be > 0, got {value}")
        for j, override in enumerate(stage.per_layer):
            try:
                re.compile(override.layers)
            except re.error as e:
                raise ScheduleError(f"{where}: key per_layer.{j}.layers: invalid regex {override.layers!r} ({e})") from None
            if override.block_size is None and override.n_centroids is None:
                raise ScheduleError(f"{where}: key per_layer.{j}: sets neither block_size nor n_centroids")
            for key in ("block_size", "n_centroids"):
                value = getattr(override, key)
                if value is not None and value <= 0:
                    raise ScheduleError(f"{where}: key per_layer.{j}.{key}: must be > 0, got {value}")


@dataclass
class LayerPlan:
    """One weight to product-quantize; ``names`` lists every module sharing it (tied weights)."""

    names: List[str]
    kind: str
    shape: List[int]
    block_size: int
    n_centroids: int
    objective: str = "weights"
    reassign_every: int = 0

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return bits_for(self.n_centroids) / self.block_size

    @property
    def compressed_bytes(self) -> float:
        """Paper accounting: codes at log2(K) bits per block plus fp16 centroids."""
        return self.n_weights / self.block_size * bits_for(self.n_centroids) / 8 + self.n_centroids * self.block_size * 2


@dataclass
class StagePlan:
    index: int
    name: str
    updates: int
    start_update: int
    layers: List[LayerPlan]


def layer_kind(module: nn.Module) -> Optional[str]:
    for kind, cls in LAYER_TYPES.items():
        if isinstance(module, cls):
            return kind
    return None


def quantizable_weights(model: nn.Module) -> Dict[int, List[str]]:
    """id(weight Parameter) -> names of the modules using it: the Linear/Embedding ones first, then
    any other module holding the same Parameter as its ``weight`` (a tied output head such as
    RoBERTa's LM head, which reads ``self.weight`` too): tied users are quantized with it."""
    groups: Dict[int, List[str]] = {}
    modules = list(model.named_modules(remove_duplicate=False))
    for name, module in modules:
        weight = module._parameters.get("weight") if layer_kind(module) else None
        if weight is not None and name not in groups.get(id(weight), []):
            groups.setdefault(id(weight), []).append(name)
    for name, module in modules:
        weight = module._parameters.get("weight") if layer_kind(module) is None else None
        if weight is not None and id(weight) in groups and name not in groups[id(weight)]:
            groups[id(weight)].append(name)
    return groups


def _check_pruned_depth(schedule: ScheduleConfig, modules: Dict[str, nn.Module], source: str) -> None:
    pruned = schedule.pruned
    if pruned is None:
        return
    stack = modules.get(pruned.stack)
    if not isinstance(stack, nn.ModuleList):
        raise ScheduleError(f"{source}: key pruned.stack: the model has no layer stack {pruned.stack}")
    if len(stack) != len(pruned.kept):
        kept = ",".join(map(str, pruned.kept))
        raise ScheduleError(f"{source}: key pruned: planned for {pruned.stack} {kept} of {pruned.of} kept, and this model has "
                            f"{len(stack)}: run `quant-noise prune CHECKPOINT --keep {kept} --stack {pruned.stack.split('.')[0]} "
                            f"-o PRUNED.pt` and start iPQ from PRUNED.pt")


def plan_schedule(schedule: ScheduleConfig, model: nn.Module, source: str = "<schedule>") -> List[StagePlan]:
    """Match each stage against ``model``; raises ScheduleError naming the stage or layer."""
    modules = dict(model.named_modules(remove_duplicate=False))
    _check_pruned_depth(schedule, modules, source)
    groups = list(quantizable_weights(model).values())
    owner: Dict[str, str] = {}
    plans, start = [], 0
    for i, stage in enumerate(schedule.stages):
        where = f"{source}: stage {i} ({stage.name})"
        pattern = re.compile(stage.layers)
        overrides = [re.compile(o.layers) for o in stage.per_layer]
        used = [False] * len(overrides)
        layers = []
        for names in groups:
            if not any(pattern.fullmatch(n) for n in names):
                continue
            if names[0] in owner:
                raise ScheduleError(f"{where}: layer {names[0]} is already quantized by stage {owner[names[0]]}")
            module = modules[names[0]]
            kind = layer_kind(module)
            defaults = schedule.defaults.get(kind, LayerTypeSettings())
            block_size = stage.block_size.get(kind, defaults.block_size)
            n_centroids = stage.n_centroids.get(kind, defaults.n_centroids)
            j = next((j for j, o in enumerate(overrides) if any(o.fullmatch(n) for n in names)), None)
            if j is not None:
                used[j] = True
                block_size = stage.per_layer[j].block_size or block_size
                n_centroids = stage.per_layer[j].n_centroids or n_centroids
            shape = list(module.weight.shape)
            try:
                check_pq_shape(names[0], shape, block_size, n_centroids)
            except ValueError as e:
                raise ScheduleError(f"{where}: {e}") from None
            owner[names[0]] = stage.name
            layers.append(LayerPlan(names, kind, shape, block_size, n_centroids, stage.objective or schedule.objective, stage.reassign_every))
        if not layers:
            raise ScheduleError(
                f"{where}: key layers: regex {stage.layers!r} matches no Linear/Embedding layer of the model "
                f"(module names look like {next((n for ns in groups for n in ns), '?')!r})"
            )
        if not all(used):
            j = used.index(False)
            raise ScheduleError(f"{where}: key per_layer.{j}.layers: regex '{stage.per_layer[j].layers}' matches none of the stage's layers")
        plans.append(StagePlan(i, stage.name, stage.updates, start, layers))
        start += stage.updates
    return plans
