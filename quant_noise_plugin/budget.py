"""A size budget turned into an iPQ schedule (``quant-noise plan``, ``--ipq-target-size``): the planner's entry point.

Every weight the schedule may quantize gets a menu of settings with their bytes (planner/menus.py); each setting's
cost is how much the calibration loss rises when that weight alone gets it (planner/measure.py); a knapsack picks
one setting per weight within the budget (planner/knapsack.py); the picks are written as a schedule YAML
(planner/schedule_yaml.py). On a model trained with LayerDrop, the planner also weighs keeping fewer layers
(planner/depth.py): the same budget planned at each candidate depth, the depth with the lowest predicted loss kept.

Plain torch: the caller brings the model, the calibration batches and how to run one (as calibration.py does).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence

from torch import nn

from .planner.check import Candidate, check_against_candidates
from .planner.depth import depth_candidates, layerdrop_stack, pruned_copy
from .planner.knapsack import Plan, allocate, check_reachable, plan_budget, planned_file_bytes, planned_model  # noqa: F401
from .planner.measure import ANCHORS, SENSITIVITIES, _carry_rises, calibration_loss, measure_menus, reference_bits_for  # noqa: F401
from .planner.menus import (  # noqa: F401
    BLOCK_SIZES, CENTROID_COUNTS, BudgetError, Choice, Setting, WeightMenu, fit_rows_for, parse_size, quantized, setting_bytes,
    settings_for, weight_menus,
)
from .planner.schedule_yaml import check_schedule_text, schedule_text  # noqa: F401

logger = logging.getLogger(__name__)

# what the defaults plan: bumped when a default changes the plans (2: two anchors), so cached runs that planned
# for a size (--ipq-target-size) are not taken for today's
PLANNER_VERSION = 2


def plan_schedule_for_budget(model: nn.Module, state: Dict, batches: Sequence[Any], run: Callable[[Any], Any], target_bytes: int,
                             scalar_bits: Optional[int] = 8, objective: str = "output", updates: int = 500,
                             block_sizes: Sequence[int] = BLOCK_SIZES, centroid_counts: Sequence[int] = CENTROID_COUNTS,
                             measure_all: bool = False, title: str = "", progress: Optional[Callable[[str], None]] = None,
                             sensitivity: str = "measured", anchors: int = ANCHORS, layerdrop: Optional[Dict[str, float]] = None,
                             run_for: Optional[Callable[[nn.Module], Callable[[Any], Any]]] = None,
                             candidates: Sequence[Candidate] = ()) -> tuple:
    """The whole planner, as `quant-noise plan` and the iPQ task's ``--ipq-target-size`` run it: (Plan, schedule YAML
    text). The target is checked against what the menus reach before anything is measured.

    ``layerdrop`` ({side: rate} of the model config) and ``run_for`` (model -> run): on a stack trained with LayerDrop,
    the budget is planned at each depth (planner/depth.py) and the plan with the lowest predicted loss kept;
    its YAML then says which layers to keep (``pruned``).

    ``candidates``: schedules of the same budget to measure the plan against (planner/check.py); the one with the
    lowest calibration loss, every weight quantized at once, is written (the plan unless a candidate beats it)."""
    stack = layerdrop_stack(model, layerdrop or {}) if run_for is not None else None
    depths = depth_candidates(model, stack) if stack is not None else []
    if len(depths) < 2:
        plan = _plan_at_depth(model, state, batches, run, target_bytes, scalar_bits, block_sizes, centroid_counts, measure_all,
                              progress, sensitivity, anchors)
        text = schedule_text(plan, model, updates=updates, objective=objective, title=title)
        return plan, _checked(plan, text, model, run, model, run, state, batches, candidates, block_sizes, centroid_counts)
    tried, lines, errors = [], [], []
    for candidate in depths:
        pruned = pruned_copy(model, candidate) if candidate.prunes else model
        if progress:
            progress(f"depth: planning with {candidate.label()}")
        try:
            plan = _plan_at_depth(pruned, state, batches, run_for(pruned), target_bytes, scalar_bits, block_sizes, centroid_counts,
                                  measure_all, progress, sensitivity, anchors)
        except BudgetError as e:  # out of reach at this depth (too small a target for every layer, or too large a one)
            errors.append(e)
            lines.append(f"  {candidate.label()}: not planned ({e})")
            continue
        predicted = plan.base_loss + plan.estimated_rise
        tried.append((predicted, candidate, plan, pruned))
        lines.append(f"  {candidate.label()}: calibration loss {plan.base_loss:.4f} before iPQ, planned rise {plan.estimated_rise:+.4f}, "
                     f"{predicted:.4f} predicted")
    if not tried:
        raise errors[0]
    predicted, candidate, plan, pruned = min(tried, key=lambda t: t[0])
    plan.pruned = candidate
    verdict = (f"keeps {candidate.label()}: run `quant-noise prune` with --keep {','.join(map(str, candidate.kept))} first"
               if candidate.prunes else f"keeps {candidate.label()}: pruning predicts a higher loss at this budget")
    plan.depth_lines = [f"Depth ({stack} was trained with LayerDrop): the lowest predicted loss {verdict}.", *lines]
    text = schedule_text(plan, pruned, updates=updates, objective=objective, title=title)
    planned_run = run_for(pruned) if candidate.prunes else run
    return plan, _checked(plan, text, pruned, planned_run, model, run, state, batches, candidates, block_sizes, centroid_counts)


def _checked(plan: Plan, text: str, planned, planned_run, model, run, state, batches, candidates, block_sizes,
             centroid_counts) -> str:
    """The plan's YAML, or a candidate's that measured better (saying so in its first lines)."""
    if not candidates:
        return text
    winner, rows = check_against_candidates(plan, planned, planned_run, model, run, state, batches, candidates,
                                            lambda m, bits: weight_menus(m, bits, block_sizes, centroid_counts))
    plan.check_lines = ["Checked by measurement (every weight quantized at once, calibration loss before finetuning):"]
    plan.check_lines += [f"  {row.name}: " + (f"{row.loss:.4f}, {row.file_bytes:,} bytes" if row.loss is not None else row.reason)
                         for row in rows]
    if winner is None:
        plan.check_lines.append("  the plan measured lowest: kept")
        return text.replace("\ndefaults:", "".join(f"\n# {line}" for line in plan.check_lines) + "\ndefaults:", 1)
    plan.kept_candidate = winner.name
    plan.check_lines.append(f"  {winner.name} measured lower than the plan: written instead")
    return "".join(f"# {line}\n" for line in plan.check_lines) + winner.text


def _plan_at_depth(model, state, batches, run, target_bytes, scalar_bits, block_sizes, centroid_counts, measure_all, progress,
                   sensitivity, anchors) -> Plan:
    menus = weight_menus(model, scalar_bits, block_sizes, centroid_counts)
    reach = check_reachable(model, state, menus, target_bytes, scalar_bits)
    base = measure_menus(model, menus, batches, run, scalar_bits, reference_bits_for(menus, target_bytes), measure_all,
                         progress=progress, sensitivity=sensitivity, anchors=anchors)
    return plan_budget(model, state, menus, target_bytes, scalar_bits, base, len(batches), reach)


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
