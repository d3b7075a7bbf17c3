"""One setting per weight within a byte budget: a multiple-choice knapsack (dynamic programming over bytes) that
minimizes the summed loss rise, with the packed file's container bytes measured on the planned model."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from torch import nn

from ..compressed import attach_pq_plan, mark_fitted, scalar_quantize_remaining_
from ..packing import predicted_file
from ..schedule import LayerPlan
from .depth import DepthCandidate
from .menus import BudgetError, Choice, WeightMenu

RESOLUTION = 20000  # byte buckets of the knapsack: each weight's bytes round up to budget / RESOLUTION


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
    pruned: Optional[DepthCandidate] = None  # planned for the model with fewer layers (planner/depth.py)
    depth_lines: List[str] = field(default_factory=list)  # why that depth: each candidate's predicted loss
    check_lines: List[str] = field(default_factory=list)  # the plan measured against candidate schedules (planner/check.py)
    kept_candidate: Optional[str] = None  # a candidate schedule measured better and was written instead

    @property
    def estimated_rise(self) -> float:
        return sum(c.rise for c in self.picks)


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
