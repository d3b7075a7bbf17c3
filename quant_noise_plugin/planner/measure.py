"""What each menu setting costs: how much the calibration loss rises when that weight alone gets it.

The rise is measured (the weight replaced by its quantized form, the calibration batches run) at one reference
setting per weight, by default also at its coarsest, and carried to the weight's other settings by their
activation-weighted error (calibration.InputMoments.importance: the estimate of the output error that the activations
objective minimizes); ``measure_all`` measures every setting instead, which is how the proxy is checked; ``fisher``
estimates every rise from squared gradients instead, for models too large to run the batches once per weight.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..calibration import collect_input_moments
from .menus import SAMPLE_WEIGHTS, BudgetError, Setting, WeightMenu, fit_rows_for, quantized

ANCHORS = 2  # measured settings per weight by default (--anchors): the reference, and the coarsest PQ setting


SENSITIVITIES = ("measured", "fisher")


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


def reference_bits_for(menus: Sequence[WeightMenu], target_bytes: int) -> float:
    """Where the proxy is anchored: the budget's mean bits per weight, between 0.25 and 2 (a rise large enough to read)."""
    return min(2.0, max(0.25, 8 * target_bytes / sum(math.prod(m.shape) for m in menus)))


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
