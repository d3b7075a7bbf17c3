"""Calibrating int8 activations: observe each quantized Linear's input on training batches, then fix
its (scale, zero point). Plain torch: the caller brings the batches and how to run one (cli.py
builds them with fairseq).

Two passes over the same batches (activations.ActivationStats): the exact range, then a histogram
over it, from which the observer picks the range. The model runs in eval mode, with its weights as
they will be stored (int8 or PQ), inputs still in float.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from .activations import ActivationQuantizer, ActivationStats, check_activation_bits
from .compressed import activation_targets, attach_activation_quantizer, route_int8_attention

logger = logging.getLogger(__name__)


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
