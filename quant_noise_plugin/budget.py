"""A size budget turned into an iPQ schedule (``quant-noise plan``, ``--ipq-target-size``).

Every weight the schedule may quantize gets a menu of settings (PQ block size x centroid count, or left out of PQ:
int codes at pack time under the schedule's ``final_scalar_bits``, else fp16), each with its bytes as the packed file
stores them (sizes.py) and its cost: how much the calibration loss rises when that weight alone gets that setting.
The rise is measured (the weight replaced by its quantized form, the calibration batches run) at one reference
setting per weight and carried to the weight's other settings in proportion to their activation-weighted error
(calibration.InputMoments.importance: the estimate of the output error that the activations objective minimizes);
``measure_all`` measures every setting instead, which is how the proxy is checked. A multiple-choice knapsack
(dynamic programming over bytes) then picks one setting per weight that minimizes the summed rise within the budget.

Plain torch: the caller brings the model, the calibration batches and how to run one (as calibration.py does).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .bitpack import bits_for
from .calibration import collect_input_moments
from .compressed import attach_pq_plan, mark_fitted, scalar_quantize_remaining_
from .errors import QuantNoiseError
from .packing import predicted_file
from .kmeans import assign
from .pq import PQCodebook
from .providers import PROVIDER_CHILDREN
from .scalar import ScalarCodes
from .schedule import LayerPlan, layer_kind, plan_schedule, quantizable_weights, schedule_from_dict
from .sizes import pq_bytes, scalar_bytes

logger = logging.getLogger(__name__)

BLOCK_SIZES = (4, 8, 16)
CENTROID_COUNTS = (4, 8, 16, 32, 64, 128, 256)
# what the defaults plan: bumped when a default changes the plans (2: two anchors), so cached runs that planned
# for a size (--ipq-target-size) are not taken for today's
PLANNER_VERSION = 2
ANCHORS = 2  # measured settings per weight by default (--anchors): the reference, and the coarsest PQ setting
SAMPLE_WEIGHTS = 1 << 18  # the proxy's errors are read on this many weights of each layer (whole rows), at most
FIT_WEIGHTS = 1 << 16  # fisher (large models): its k-means fits on this many (>= 32 blocks per centroid), the rest held out
RESOLUTION = 20000  # byte buckets of the knapsack: each weight's bytes round up to budget / RESOLUTION
STAGE_ORDER = ("embeddings", "ffn", "attention", "other")


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


@dataclass
class Plan:
    """A setting per weight and what the budget planner predicted for it."""

    menus: List[WeightMenu]
    picks: List[Choice]
    target_bytes: int
    predicted_file_bytes: int
    scalar_bits: Optional[int]
    base_loss: float
    n_batches: int
    smallest_bytes: int = 0
    largest_bytes: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def estimated_rise(self) -> float:
        return sum(c.rise for c in self.picks)


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


def calibration_loss(batches: Sequence[Any], run: Callable[[Any], Any]) -> float:
    """Mean loss per counted output (the criterion's sum over its sample size) over ``batches``."""
    total = size = 0.0
    for batch in batches:
        loss, sample_size = run(batch)[:2]
        total += float(loss)
        size += float(sample_size)
    return total / max(size, 1.0)


@contextlib.contextmanager
def _weight_replaced(model: nn.Module, name: str, value: Tensor):
    """The weight of ``name`` (and every module tied to it: one Parameter) holds ``value`` inside the block."""
    weight = model.get_submodule(name)._parameters["weight"]
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(value.to(weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _reference(settings: Sequence[Setting], bits: float) -> Setting:
    """The PQ setting nearest ``bits`` per weight (fewer bytes on a tie): where a weight's rise is measured."""
    pq = [s for s in settings if s.is_pq]
    return min(pq, key=lambda s: (abs(s.bits_per_weight(None) - bits), s.bits_per_weight(None), -s.block_size))


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


SENSITIVITIES = ("measured", "fisher")


def gradient_squares(model: nn.Module, menus: Sequence[WeightMenu], batches: Sequence[Any], run: Callable[[Any], Any]) -> Dict[str, Tensor]:
    """Per weight, the mean over batches of the squared gradient of the loss per counted output: the diagonal of the
    empirical Fisher, the curvature estimate of the ``fisher`` sensitivity (SqueezeLLM's, HAWQ-style). One backward
    pass per batch for every weight at once. The model's own gradients are left as they were."""
    weights = {m.name: model.get_submodule(m.name)._parameters["weight"] for m in menus}
    targets = {id(w) for w in weights.values()}
    saved = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    squares = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for p, _, _ in saved:  # gradients of the weights planned only
            p.requires_grad_(id(p) in targets)
        with torch.enable_grad():
            for batch in batches:
                for w in weights.values():
                    w.grad = None
                loss, sample_size = run(batch)[:2]
                (loss / max(float(sample_size), 1.0)).backward()
                for name, w in weights.items():
                    if w.grad is not None:
                        squares[name] += w.grad.detach().float() ** 2 / len(batches)
    finally:
        for p, grad, requires in saved:
            p.grad = grad
            p.requires_grad_(requires)
    return squares


@torch.no_grad()
def measure_menus(model: nn.Module, menus: List[WeightMenu], batches: Sequence[Any], run: Callable[[Any], Any],
                  scalar_bits: Optional[int] = 8, reference_bits: float = 1.0, measure_all: bool = False, n_iter: int = 10,
                  seed: int = 0, backend: str = "auto", progress: Optional[Callable[[str], None]] = None,
                  sensitivity: str = "measured", anchors: int = ANCHORS) -> float:
    """Fill each menu's errors and loss rises; returns the model's calibration loss. ``run(batch)`` returns the
    criterion's (loss, sample_size, ...). The model runs in eval mode; its weights are back as they were on return.

    ``sensitivity``: ``measured`` (the rise measured at one reference setting per weight, carried to the others by
    their activation-weighted error; ``measure_all``: measured at every setting) or ``fisher`` (no loss measured per
    weight: the rise of each setting estimated as 1/2 sum F dW^2 with F the squared gradients, ``gradient_squares``;
    one backward pass per batch in all, for models too large to run the batches once per weight; its errors come from a
    k-means on a few rows of each large layer, read on more: fit_rows_for). ``anchors=2`` (measured, the default): the
    rise is also measured at each weight's coarsest PQ setting, and carried piecewise (see _carry_rises); ``anchors=1``
    measures the reference alone (a noise-trained model shows no rise there, and its coarse settings then look free)."""
    if anchors not in (1, 2):
        raise BudgetError(f"--anchors {anchors}: 1 (the reference setting) or 2 (and the coarsest)")
    if sensitivity not in SENSITIVITIES:
        raise BudgetError(f"--sensitivity {sensitivity}: use {', '.join(SENSITIVITIES)}")
    moments = collect_input_moments(model, {m.name: m.names for m in menus}, batches, run)
    was_training = model.training
    model.eval()
    try:
        base = calibration_loss(batches, run)
        fisher = gradient_squares(model, menus, batches, run) if sensitivity == "fisher" else None
        generator = torch.Generator().manual_seed(seed)
        for menu in menus:
            weight = model.get_submodule(menu.name)._parameters["weight"].detach().float()
            importance = moments[menu.name].importance_for(weight)  # uniform for a head the task never runs: the weight error
            # the proxy's errors on whole rows, up to 2^18 weights of them (fisher: its k-means fitted on fewer, fit_rows_for)
            rows = max(1, min(weight.shape[0], math.ceil(SAMPLE_WEIGHTS / max(1, weight[0].numel()))))
            picked = torch.randperm(weight.shape[0], generator=generator)[:rows]
            if fisher is None:  # (fisher: left in random order, the k-means fits on the first rows)
                picked = picked.sort().values
            sample, sample_importance = weight[picked], importance[picked].contiguous()
            sample_fisher = None if fisher is None else fisher[menu.name][picked]
            for choice in menu.choices:
                approx = quantized(sample, choice.setting, scalar_bits, sample_importance, n_iter, seed, backend,
                                   fit_rows_for(weight.shape, choice.setting) if fisher is not None else None)
                choice.error = float((sample_importance * (sample - approx) ** 2).sum())
                if sample_fisher is not None:  # the sampled rows' estimate, scaled to the whole weight
                    choice.rise = 0.5 * float((sample_fisher * (sample - approx) ** 2).sum()) * weight.shape[0] / sample.shape[0]
            if any(c.setting.is_pq for c in menu.choices):
                menu.reference = _reference([c.setting for c in menu.choices], reference_bits)
            if fisher is not None:
                menu.measured_rise = next(c.rise for c in menu.choices if c.setting == menu.reference)
                if progress:
                    progress(f"{menu.name}: estimated loss rise {menu.measured_rise:+.4f} at {menu.reference.label(scalar_bits)} (fisher)")
                continue
            if anchors == 2 and any(c.setting.is_pq for c in menu.choices):
                menu.coarse = min((c for c in menu.choices if c.setting.is_pq), key=lambda c: (c.bytes, c.error)).setting
            anchored = (menu.reference, menu.coarse)
            for choice in menu.choices if measure_all else [c for c in menu.choices if c.setting in anchored]:
                approx = quantized(weight, choice.setting, scalar_bits, importance, n_iter, seed, backend)
                with _weight_replaced(model, menu.name, approx):
                    choice.rise = calibration_loss(batches, run) - base
                if choice.setting == menu.reference:
                    menu.measured_rise = choice.rise
                if choice.setting == menu.coarse:
                    menu.coarse_rise = choice.rise
            if progress:
                progress(f"{menu.name}: loss rise {menu.measured_rise:+.4f} at {menu.reference.label(scalar_bits)}")
    finally:
        model.train(was_training)
    if not measure_all and fisher is None:
        _carry_rises(menus)
    return base


def _carry_rises(menus: List[WeightMenu]) -> None:
    """The proxy: each setting's rise is the measured one scaled by the setting's error over the reference's. A
    weight whose measured rise is not positive (too small to see on these batches) counts a thousandth of the mean
    positive rise per unit of error, so that it still prefers its smaller errors. With a second anchor (the coarsest
    setting, measured too), the rise is linear in the error between the two anchors and proportional beyond them:
    a reference too fine to show a rise (a model trained with noise) no longer makes its coarse settings look free."""
    positive = [m.measured_rise for m in menus if m.measured_rise > 0]
    floor = 1e-3 * (sum(positive) / len(positive)) if positive else 1e-6
    for menu in menus:
        anchor = next(c for c in menu.choices if c.setting == menu.reference)
        low = (anchor.error, max(menu.measured_rise, floor))
        gain = low[1] / max(low[0], 1e-30)
        high = None
        if menu.coarse is not None and menu.coarse != menu.reference:
            coarse = next(c for c in menu.choices if c.setting == menu.coarse)
            high = (coarse.error, max(menu.coarse_rise, low[1]))
            if high[0] < low[0]:
                low, high = high, low
            if high[0] - low[0] <= 1e-30:
                high = None
        for choice in menu.choices:
            if high is None:
                choice.rise = gain * choice.error
            elif choice.error <= low[0]:
                choice.rise = low[1] / max(low[0], 1e-30) * choice.error
            elif choice.error >= high[0]:
                choice.rise = high[1] / max(high[0], 1e-30) * choice.error
            else:
                choice.rise = low[1] + (high[1] - low[1]) * (choice.error - low[0]) / (high[0] - low[0])


def allocate(menus: Sequence[WeightMenu], budget: int, resolution: int = RESOLUTION) -> Optional[List[int]]:
    """One choice per menu minimizing the summed rise with the summed bytes at most ``budget`` (a multiple-choice
    knapsack by dynamic programming; each choice's bytes round up to a bucket of budget / resolution, so the
    answer always fits). None when even the smallest choices do not fit."""
    if budget <= 0:
        return None
    unit = budget / resolution
    cost = np.full(resolution + 1, np.inf)
    cost[0] = 0.0
    taken = []
    for menu in menus:
        new = np.full(resolution + 1, np.inf)
        pick = np.full(resolution + 1, -1, dtype=np.int32)
        for i, choice in enumerate(menu.choices):
            w = math.ceil(choice.bytes / unit - 1e-9)
            if w > resolution:
                continue
            # ties go to fewer bytes: a rise counted exactly equal does not spend the budget
            candidate = np.full(resolution + 1, np.inf)
            candidate[w:] = cost[: resolution + 1 - w] + choice.rise + 1e-12 * choice.bytes
            better = candidate < new
            new[better], pick[better] = candidate[better], i
        cost = new
        taken.append(pick)
    if not np.isfinite(cost).any():
        return None
    at = int(np.argmin(cost))
    picks = []
    for menu, pick in zip(reversed(menus), reversed(taken)):
        i = int(pick[at])
        picks.append(i)
        at -= math.ceil(menu.choices[i].bytes / unit - 1e-9)
    return picks[::-1]


def planned_model(model: nn.Module, menus: Sequence[WeightMenu], picks: Sequence[Choice], scalar_bits: Optional[int]) -> nn.Module:
    """A copy of ``model`` stored as the picks say (PQ codebooks marked fitted but not k-means'd: for sizes only)."""
    planned = copy.deepcopy(model)
    for menu, choice in zip(menus, picks):
        if choice.setting.is_pq:
            codebook = attach_pq_plan(planned, LayerPlan(menu.names, menu.kind, menu.shape, choice.setting.block_size,
                                                         choice.setting.n_centroids))
            mark_fitted(codebook)
    if scalar_bits:
        scalar_quantize_remaining_(planned, scalar_bits)
    return planned


def check_reachable(model: nn.Module, state: Dict, menus: List[WeightMenu], target_bytes: int, scalar_bits: Optional[int]) -> tuple:
    """(smallest, largest) packed file the menus reach; a target outside is a one-line error saying both."""
    low = planned_file_bytes(model, state, menus, [min(m.choices, key=lambda c: c.bytes) for m in menus], scalar_bits)
    high = planned_file_bytes(model, state, menus, [max(m.choices, key=lambda c: c.bytes) for m in menus], scalar_bits)
    if not low <= target_bytes <= high:
        raise BudgetError(f"target {target_bytes / 1e6:.4f} MB is out of reach: this model's packed file can be {low / 1e6:.4f} MB "
                          f"(every weight at its coarsest setting) to {high / 1e6:.4f} MB ({'int' + str(scalar_bits) if scalar_bits else 'fp16'}, no PQ)")
    return low, high


def planned_file_bytes(model: nn.Module, state: Dict, menus: Sequence[WeightMenu], picks: Sequence[Choice], scalar_bits: Optional[int]) -> int:
    """The packed file's bytes were the model stored as ``picks`` say (sizes.py's count plus the container's)."""
    return int(predicted_file(planned_model(model, menus, picks, scalar_bits), state, scalar_bits)["predicted_packed_file_bytes"])


def plan_budget(model: nn.Module, state: Dict, menus: List[WeightMenu], target_bytes: int, scalar_bits: Optional[int],
                base_loss: float, n_batches: int, reach: Optional[tuple] = None) -> Plan:
    """The picks whose packed file lands on ``target_bytes`` (within 1% below it, unless every weight already has
    its best setting). The container's own bytes (keys, other tensors, checksums) are measured on the planned model
    and the knapsack rerun on what is left; a target out of reach is a one-line error with the reachable range
    (``reach``: check_reachable's answer, when the caller already has it)."""

    def file_bytes(picks: List[Choice]) -> int:
        return planned_file_bytes(model, state, menus, picks, scalar_bits)

    smallest = [min(m.choices, key=lambda c: c.bytes) for m in menus]
    largest = [max(m.choices, key=lambda c: c.bytes) for m in menus]
    low, high = reach or check_reachable(model, state, menus, target_bytes, scalar_bits)
    overhead = low - sum(c.bytes for c in smallest)
    best = None
    for _ in range(6):
        indices = allocate(menus, target_bytes - overhead)
        picks = smallest if indices is None else [m.choices[i] for m, i in zip(menus, indices)]
        predicted = file_bytes(picks)
        if predicted <= target_bytes and (best is None or sum(c.rise for c in picks) < sum(c.rise for c in best[0])):
            best = (picks, predicted)
        if predicted <= target_bytes and (predicted >= 0.99 * target_bytes or all(p is b for p, b in zip(picks, largest))):
            break
        overhead = predicted - sum(c.bytes for c in picks)  # the container's bytes for this mix of settings
        if predicted > target_bytes:
            overhead += 1
    picks, predicted = best if best is not None else (smallest, low)
    plan = Plan(menus, picks, target_bytes, predicted, scalar_bits, base_loss, n_batches, low, high)
    if predicted < 0.99 * target_bytes:
        note = f"the plan uses {predicted / target_bytes:.1%} of the target: no setting on the menu spends more where it lowers the loss"
        largest = max((c.setting.n_centroids for m in menus for c in m.choices if c.setting.is_pq), default=0)
        topped = [m.name for m, c in zip(menus, picks) if c.setting.is_pq and c.setting.n_centroids == largest]
        if topped:  # the menu's top is what stopped it: more centroids would spend the rest
            note += (f"; {len(topped)} weight(s) at the menu's largest K ({largest}, e.g. {topped[0]}): "
                     f"--centroids ... {2 * largest} {4 * largest} offers more")
        plan.notes.append(note)
    return plan


def _family(name: str) -> str:
    """The regex of a layer and its siblings in the other blocks: decoder.layers.3.fc1 -> decoder\\.layers\\.\\d+\\.fc1."""
    return re.sub(r"\\\.\d+\\\.", lambda m: r"\.\d+\.", re.escape(name))


def _stage_of(menu: WeightMenu) -> str:
    leaf = menu.name.rsplit(".", 1)[-1]
    if menu.kind == "Embedding":
        return "embeddings"
    if re.fullmatch(r"fc\d+", leaf):
        return "ffn"
    return "attention" if "attn" in menu.name else "other"


def schedule_text(plan: Plan, model: nn.Module, updates: int = 500, objective: str = "output", kmeans_iterations: int = 20,
                  title: str = "") -> str:
    """The plan as a schedule YAML in today's format, with per-layer settings and comments saying why; it is read
    back through the schedule's own validation and checked to give every weight its planned setting."""
    bits = plan.scalar_bits
    by_stage: Dict[str, List[tuple]] = {}
    left_out = []
    for menu, choice in zip(plan.menus, plan.picks):
        (by_stage.setdefault(_stage_of(menu), []) if choice.setting.is_pq else left_out).append((menu, choice))
    stages = [s for s in STAGE_ORDER if s in by_stage]
    if not stages:
        raise BudgetError(f"target {plan.target_bytes / 1e6:.4f} MB: every weight is best left out of PQ at this size; "
                          f"pack with `quant-noise pack --scalar-bits {bits or 8}` instead of running iPQ")
    families: Dict[str, set] = {}
    for menu in plan.menus:
        families.setdefault(_family(menu.name), set()).add(menu.name)

    def why(menu: WeightMenu, choice: Choice) -> str:
        return (f"#   {menu.name} ({'x'.join(map(str, menu.shape))}): {choice.setting.label(bits)}, "
                f"{choice.setting.bits_per_weight(bits):.2f} bits/w, {choice.bytes:,} B, est. loss rise {choice.rise:+.5f}; "
                f"measured {menu.measured_rise:+.5f} at {menu.reference.label(bits)}"
                + (f" and {menu.coarse_rise:+.5f} at {menu.coarse.label(bits)}" if menu.coarse and menu.coarse != menu.reference else ""))

    lines = [f"# {title or 'Planned by quant-noise plan'}: a packed file of {plan.predicted_file_bytes:,} bytes predicted "
             f"for a target of {plan.target_bytes:,} ({plan.predicted_file_bytes / plan.target_bytes:.2%})."]
    lines.append(f"# Calibration loss {plan.base_loss:.4f} nats per token over {plan.n_batches} training batches; the picks' "
                 f"summed estimated rise {plan.estimated_rise:+.4f} (each weight alone, before finetuning).")
    if any(m.coarse for m in plan.menus):
        lines.append("# A weight's rise is measured at two settings (the reference and its coarsest) and carried to the others")
        lines.append("# linearly in their activation-weighted error between them;")
    else:
        lines.append("# A weight's rise is measured at one setting and carried to the others by their activation-weighted error;")
    lines.append("# edit freely: `quant-noise schedule CKPT THIS.yaml` checks it, the iPQ task runs it.")
    lines += [f"# {note}" for note in plan.notes]
    if left_out:
        lines.append(f"# Left out of PQ ({'int' + str(bits) + ' codes at pack, final_scalar_bits' if bits else 'fp16'}):")
        lines += [why(m, c) for m, c in left_out]
    lines += ["defaults:", "  Linear: {block_size: 8, n_centroids: 256}", "  Embedding: {block_size: 8, n_centroids: 256}",
              f"final_scalar_bits: {bits if bits else 'null'}", f"kmeans_iterations: {kmeans_iterations}",
              f"objective: {objective}", "seed: 0", "stages:"]
    per_stage = [updates // len(stages) + (i < updates % len(stages)) for i in range(len(stages))]
    for stage, stage_updates in zip(stages, per_stage):
        members = by_stage[stage]
        names = {m.name for m, _ in members}
        parts = []
        for menu, _ in members:
            family = _family(menu.name)
            part = family if families[family] <= names else re.escape(menu.name)
            if part not in parts:
                parts.append(part)
        lines.append(f"  - name: {stage}")
        lines += ["  " + why(m, c) for m, c in members]
        lines.append(f"    layers: '{'|'.join(parts)}'")
        lines.append(f"    updates: {max(1, stage_updates)}")
        common = {}
        for kind in ("Linear", "Embedding"):
            settings = [c.setting for m, c in members if m.kind == kind]
            if settings:
                common[kind] = max(set(settings), key=lambda s: (settings.count(s), s.bits_per_weight(None)))
        if common:
            lines.append("    block_size: {" + ", ".join(f"{k}: {s.block_size}" for k, s in common.items()) + "}")
            lines.append("    n_centroids: {" + ", ".join(f"{k}: {s.n_centroids}" for k, s in common.items()) + "}")
        exceptions = [(m, c) for m, c in members if c.setting != common[m.kind]]
        if exceptions:
            lines.append("    per_layer:")
            lines += [f"      - {{layers: '{re.escape(m.name)}', block_size: {c.setting.block_size}, n_centroids: {c.setting.n_centroids}}}"
                      for m, c in exceptions]
    text = "\n".join(lines) + "\n"
    check_schedule_text(text, plan, model)
    return text


def check_schedule_text(text: str, plan: Plan, model: nn.Module) -> None:
    """The YAML parses, validates, and gives each weight exactly its planned setting (and leaves the rest out)."""
    import yaml

    schedule = schedule_from_dict(yaml.safe_load(text), "<plan>")
    layers = {p.name: (p.block_size, p.n_centroids) for stage in plan_schedule(schedule, model, "<plan>") for p in stage.layers}
    wanted = {m.name: (c.setting.block_size, c.setting.n_centroids) for m, c in zip(plan.menus, plan.picks) if c.setting.is_pq}
    if layers != wanted:
        wrong = sorted(set(layers.items()) ^ set(wanted.items()))[0][0]
        raise AssertionError(f"the planned schedule does not give layer {wrong} its planned setting")


def reference_bits_for(menus: Sequence[WeightMenu], target_bytes: int) -> float:
    """Where the proxy is anchored: the budget's mean bits per weight, between 0.25 and 2 (a rise large enough to read)."""
    return min(2.0, max(0.25, 8 * target_bytes / sum(math.prod(m.shape) for m in menus)))


def plan_schedule_for_budget(model: nn.Module, state: Dict, batches: Sequence[Any], run: Callable[[Any], Any], target_bytes: int,
                             scalar_bits: Optional[int] = 8, objective: str = "output", updates: int = 500,
                             block_sizes: Sequence[int] = BLOCK_SIZES, centroid_counts: Sequence[int] = CENTROID_COUNTS,
                             measure_all: bool = False, title: str = "", progress: Optional[Callable[[str], None]] = None,
                             sensitivity: str = "measured", anchors: int = ANCHORS) -> tuple:
    """The whole planner, as `quant-noise plan` and the iPQ task's ``--ipq-target-size`` run it: (Plan, schedule YAML
    text). The target is checked against what the menus reach before anything is measured."""
    menus = weight_menus(model, scalar_bits, block_sizes, centroid_counts)
    reach = check_reachable(model, state, menus, target_bytes, scalar_bits)
    base = measure_menus(model, menus, batches, run, scalar_bits, reference_bits_for(menus, target_bytes), measure_all,
                         progress=progress, sensitivity=sensitivity, anchors=anchors)
    plan = plan_budget(model, state, menus, target_bytes, scalar_bits, base, len(batches), reach)
    return plan, schedule_text(plan, model, updates=updates, objective=objective, title=title)


def parse_target(text: str, dense_fp32_bytes: int, flag: str = "--ipq-target-size") -> int:
    """A size ('200KB', see parse_size) or a ratio to the fp32 model ('x40')."""
    text = str(text).strip()
    if text[:1] in ("x", "X"):
        try:
            ratio = float(text[1:])
        except ValueError:
            ratio = 0.0
        if not ratio > 1:
            raise BudgetError(f"{flag} {text}: a ratio is x followed by a number > 1 (x40: 40 times smaller than fp32)")
        return int(dense_fp32_bytes / ratio)
    return parse_size(text, flag)
