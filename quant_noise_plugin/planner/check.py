"""A plan checked against a measurement: the planned model's calibration loss against candidate schedules'.

The knapsack adds each weight's rise measured alone; at extreme ratios the rises stop adding up and a plan can lose
to a hand-written schedule of the same size. Here every weight is quantized at once, as the plan (or a candidate)
says, with the same k-means (activation-weighted, as the proxy's), and the calibration batches are run: the lower
loss wins. A candidate whose packed file would exceed the budget is not considered.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..calibration import InputMoments, collect_input_moments
from ..schedule import ScheduleConfig, ScheduleError, load_schedule, plan_schedule
from .knapsack import Plan, planned_file_bytes
from .measure import calibration_loss
from .menus import Choice, Setting, WeightMenu, quantized, setting_bytes


@dataclass
class Candidate:
    name: str  # where it came from (a file name)
    schedule: ScheduleConfig
    text: str

    @classmethod
    def from_file(cls, path: str) -> "Candidate":
        """A schedule YAML, type-checked (one-line errors naming the file), with the text to write should it win."""
        return cls(os.path.basename(path), load_schedule(path), Path(path).read_text())


@dataclass
class CheckRow:
    name: str
    file_bytes: Optional[int]
    loss: Optional[float]
    reason: str = ""  # why it was not measured


def candidate_picks(schedule: ScheduleConfig, model: nn.Module, menus: Sequence[WeightMenu], source: str) -> List[Choice]:
    """The candidate's setting for each menu's weight, as a Choice (settings off the menu get their bytes computed)."""
    settings = {p.name: Setting(p.block_size, p.n_centroids) for stage in plan_schedule(schedule, model, source) for p in stage.layers}
    bits = schedule.final_scalar_bits
    picks = []
    for menu in menus:
        setting = settings.get(menu.name, Setting())
        picks.append(next((c for c in menu.choices if c.setting == setting), None) or Choice(setting, setting_bytes(menu.shape, setting, bits), 0.0))
    return picks


@torch.no_grad()
def joint_loss(model: nn.Module, menus: Sequence[WeightMenu], picks: Sequence[Choice], batches: Sequence[Any],
               run: Callable[[Any], Any], scalar_bits: Optional[int], moments: Dict[str, InputMoments], seed: int = 0) -> float:
    """The calibration loss with every weight quantized at once as ``picks`` say (weights restored on return);
    ``moments``: the model's input statistics by weight name (collect_input_moments), which weigh the k-means."""
    saved: Dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for menu, choice in zip(menus, picks):
            weight = model.get_submodule(menu.name)._parameters["weight"]
            saved[menu.name] = weight.detach().clone()
            importance = moments[menu.name].importance_for(weight.detach().float())
            weight.copy_(quantized(weight, choice.setting, scalar_bits, importance, seed=seed).to(weight.dtype))
        return calibration_loss(batches, run)
    finally:
        for name, value in saved.items():
            model.get_submodule(name)._parameters["weight"].copy_(value)
        model.train(was_training)


def check_against_candidates(plan: Plan, planned_model: nn.Module, planned_run: Callable[[Any], Any], model: nn.Module,
                             run: Callable[[Any], Any], state: Dict, batches: Sequence[Any], candidates: Sequence[Candidate],
                             menus_of: Callable[[nn.Module, Optional[int]], List[WeightMenu]]) -> tuple:
    """(the winner: None for the plan, else the Candidate; rows measured, the plan's first). ``planned_model``: the model
    the plan was made for (pruned, perhaps); ``model``: the one the candidates name; ``menus_of(model, bits)``: its
    weight menus."""
    def moments_of(m: nn.Module, menus: Sequence[WeightMenu], run_m: Callable[[Any], Any]) -> Dict[str, InputMoments]:
        return collect_input_moments(m, {menu.name: menu.names for menu in menus}, batches, run_m)

    planned_moments = moments_of(planned_model, plan.menus, planned_run)
    rows = [CheckRow("the plan", plan.predicted_file_bytes,
                     joint_loss(planned_model, plan.menus, plan.picks, batches, planned_run, plan.scalar_bits, planned_moments))]
    model_moments = planned_moments if model is planned_model else None  # the same weights' statistics: computed once
    best, best_loss = None, rows[0].loss
    for candidate in candidates:
        bits = candidate.schedule.final_scalar_bits
        menus = menus_of(model, bits)
        try:
            picks = candidate_picks(candidate.schedule, model, menus, candidate.name)
        except ScheduleError as e:
            rows.append(CheckRow(candidate.name, None, None, f"does not fit this model: {e}"))
            continue
        file_bytes = planned_file_bytes(model, state, menus, picks, bits)
        if file_bytes > plan.target_bytes:
            rows.append(CheckRow(candidate.name, file_bytes, None, f"over the budget ({file_bytes:,} > {plan.target_bytes:,} bytes)"))
            continue
        if model_moments is None:
            model_moments = moments_of(model, menus, run)
        loss = joint_loss(model, menus, picks, batches, run, bits, model_moments)
        rows.append(CheckRow(candidate.name, file_bytes, loss))
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best, rows
