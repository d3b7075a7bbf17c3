"""Calibration statistics, read by everything that compresses with data: a few training batches run through
the model, and what each layer saw is kept. Plain torch: the caller brings the batches and how to run one
(cli.py and the iPQ tasks build them with fairseq).

- ``collect_input_moments``: per weight, the second moments of its Linear inputs (the diagonal of X^T X) and
  how often each Embedding row was looked up; ``InputMoments.importance`` turns them into the per-coordinate
  weights of the activation-aware k-means (kmeans.py), so that it minimizes an estimate of the output error
  instead of the weight error.
- ``calibrate_activations_``: int8 activations, each quantized Linear's input range.

Two passes over the same batches (activations.ActivationStats): the exact range, then a histogram
over it, from which the observer picks the range. The model runs in eval mode, with its weights as
they will be stored (int8 or PQ), inputs still in float.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .activations import ActivationQuantizer, ActivationStats, check_activation_bits
from .compressed import activation_targets, attach_activation_quantizer, route_int8_attention
from .weight_swap import route_attention_through_projections

logger = logging.getLogger(__name__)

IMPORTANCE_DAMPING = 0.01  # added to each normalized statistic: no coordinate weighs exactly zero (GPTQ's damping)


@dataclass
class InputMoments:
    """What the modules sharing one weight saw: the summed squares of each input coordinate of its Linear
    uses (``input_sq``, over ``n_inputs`` input vectors) and the look-up count of each row of its Embedding use."""

    input_sq: Optional[torch.Tensor] = None  # (in_features,) float64
    n_inputs: int = 0
    row_counts: Optional[torch.Tensor] = None  # (num_embeddings,) float64
    input_outer: Optional[torch.Tensor] = None  # (in_features, in_features) float64: X^T X, when asked (``full``)

    def reached(self) -> bool:
        """Whether any calibration input reached the weight (a head the task never runs sees none)."""
        return bool(self.n_inputs) or (self.row_counts is not None and float(self.row_counts.sum()) > 0)

    def importance_for(self, weight: torch.Tensor) -> torch.Tensor:
        """``importance`` expanded to the weight's shape; uniform (the weights objective) where no calibration input
        reached the weight, e.g. a classifier's masked-LM head, which its task never runs."""
        return self.importance().expand(weight.shape) if self.reached() else torch.ones_like(weight)

    def hessian(self) -> torch.Tensor:
        """E[x x^T] of the Linear uses' inputs: what error feedback (gptq.py) weighs a weight's error by."""
        if self.input_outer is None or not self.n_inputs:
            raise ValueError("no calibration input reached this weight's Linear use")
        return (self.input_outer / self.n_inputs).float()

    def output_hessian(self) -> Optional[torch.Tensor]:
        """The column metric of the ``output`` objective (gptq.quantize_pq_to_output): E[x x^T] of the Linear uses; a
        weight also looked up (tied) mixes it, normalized to mean diagonal 1, half and half with the lookup's identity,
        as ``importance`` mixes their diagonals. None without full moments (``full``) from a Linear use: the objective
        then keeps the activations fit."""
        if self.input_outer is None or not self.n_inputs:
            return None
        h = self.hessian()
        if self.row_counts is not None:
            h = 0.5 * (torch.eye(h.shape[0]) + h / torch.diagonal(h).mean().clamp_min(1e-30))
        return h

    def row_weights(self, damping: float = IMPORTANCE_DAMPING) -> Optional[torch.Tensor]:
        """How much each row's error counts (an Embedding's look-up frequency, mean 1), or None: all rows alike."""
        if self.row_counts is None or float(self.row_counts.sum()) <= 0:
            return None
        return (self.row_counts / self.row_counts.mean() + damping).float()

    def importance(self, damping: float = IMPORTANCE_DAMPING) -> torch.Tensor:
        """Per-coordinate weights of the weight matrix (rows, cols), as a (rows or 1, cols or 1) tensor.

        A Linear's error on its output is sum_rows dW_r^T E[x x^T] dW_r: its diagonal weighs column d by E[x_d^2]. A
        looked-up row's error counts as often as the row is looked up. A weight used both ways (a tied embedding and
        output projection) weighs rows by their frequency (also the softmax's curvature, E[p_t], on average) and
        columns by half the lookup's uniform weight plus half the projection's moments. Each factor is normalized
        to mean 1 so neither use dominates by its units.
        """
        cols = None
        if self.input_sq is not None and self.n_inputs:
            moments = self.input_sq / self.n_inputs
            cols = moments / moments.mean().clamp_min(1e-30)
            if self.row_counts is not None:
                cols = 0.5 * (1.0 + cols)
            cols = (cols + damping).unsqueeze(0)
        rows = self.row_weights(damping)
        rows = None if rows is None else rows.double().unsqueeze(1)
        if rows is None and cols is None:
            raise ValueError("no calibration input reached this weight")
        weight = rows if cols is None else cols if rows is None else rows * cols
        return weight.float()


@torch.no_grad()
def collect_input_moments(model: nn.Module, weights: Dict[str, List[str]], batches: Sequence[Any],
                          run: Callable[[Any], Any], full: bool = False) -> Dict[str, InputMoments]:
    """Run ``batches`` through ``model`` (eval mode) and record, for each weight (key: a name; value: the
    modules using it), what its Linear and Embedding uses saw (``full``: also X^T X of the Linear inputs).
    Deterministic for the same batches."""
    if not batches:
        raise ValueError("no calibration batch")
    modules = dict(model.named_modules(remove_duplicate=False))
    moments = {key: InputMoments() for key in weights}

    def linear_hook(stats: InputMoments):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squares = (x * x).sum(0).double()  # one batch in float32, the running sum in float64
            stats.input_sq = squares + (0 if stats.input_sq is None else stats.input_sq)
            stats.n_inputs += x.shape[0]
            if full:
                outer = (x.T @ x).double()
                stats.input_outer = outer + (0 if stats.input_outer is None else stats.input_outer)
        return hook

    def embedding_hook(stats: InputMoments):
        def hook(module, args):
            ids = args[0].detach()
            if hasattr(module, "max_positions") and module.padding_idx is not None:
                # fairseq's learned positional embedding is given the tokens and looks up their positions
                mask = ids.ne(module.padding_idx).long()
                ids = torch.cumsum(mask, dim=1) * mask + module.padding_idx
            counts = torch.bincount(ids.flatten().cpu(), minlength=module.num_embeddings).double()
            if counts.numel() > module.num_embeddings:  # not row indices: this module maps its input to rows itself
                return
            stats.row_counts = counts + (0 if stats.row_counts is None else stats.row_counts)
        return hook

    handles, linears, hooked = [], [], set()
    for key, names in weights.items():
        for name in names:
            module = modules[name]
            if id(module) in hooked:  # a shared layer: one module under several names, each of its calls counted once
                continue
            hooked.add(id(module))
            if isinstance(module, nn.Embedding):
                handles.append(module.register_forward_pre_hook(embedding_hook(moments[key])))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_pre_hook(linear_hook(moments[key])))
                linears.append(name)
    # fused attention never calls its projections: switch the attention that holds one to the path that does
    attentions = {name: module for name, module in model.named_modules() if hasattr(module, "skip_embed_dim_check")}
    fused = {name: module.skip_embed_dim_check for name, module in attentions.items()}
    route_attention_through_projections(model, linears)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            run(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        for name, module in attentions.items():
            module.skip_embed_dim_check = fused[name]
    return moments


@torch.no_grad()
def calibrate_activations_(model: nn.Module, batches: Sequence[Any], run: Callable[[Any], Any], observer: str = "mse",
                           bits: int = 8) -> Dict[str, Tuple[float, int]]:
    """Attach an int8 input quantizer to every quantized Linear that ``run`` uses; returns their (scale, zero point)."""
    check_activation_bits(bits)
    targets = activation_targets(model)
    if not targets:
        raise ValueError("no Linear layer has a quantized weight: int8 activations need int8 (or PQ) weights first")
    if not batches:
        raise ValueError("no calibration batch")
    modules = dict(model.named_modules())
    route_int8_attention(model, targets)  # so q/k/v/out are called, and observed
    stats = {name: ActivationStats() for name in targets}
    was_training = model.training
    model.eval()
    try:
        for observe in (ActivationStats.observe_range, ActivationStats.observe_histogram):
            handles = [modules[name].register_forward_pre_hook(lambda m, args, s=stats[name], f=observe: f(s, args[0]))
                       for name in targets]
            try:
                for batch in batches:
                    run(batch)
            finally:
                for handle in handles:
                    handle.remove()
    finally:
        model.train(was_training)
    params = {}
    for name in targets:
        if not stats[name].observed:  # a layer the task never runs (RoBERTa's LM head in a classifier)
            logger.info("calibration: %s never ran on these batches; its input stays float", name)
            continue
        scale, zero_point = stats[name].qparams(observer, bits)
        attach_activation_quantizer(modules[name], ActivationQuantizer(scale, zero_point, bits))
        params[name] = (scale, zero_point)
    route_int8_attention(model)
    return params
