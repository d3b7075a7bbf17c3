"""A compressed weight decoded once for inference, not at every forward. Plain torch.

A PQ or int weight is rebuilt from its codes (a gather, a dequantization) each time its layer runs;
in training that is what carries gradients to the centroids. In inference nothing changes between
forwards, so ``decoded(provider)`` keeps the dense weight it built and returns it again, as long as
the provider is in eval mode, no gradient is recorded, and none of its tensors changed (keyed by
each tensor's storage and in-place version counter: an optimizer step or a load invalidates it).
The cost is the dense weight in memory: ``QUANT_NOISE_LOW_MEMORY=1`` rebuilds it at every forward
instead, for devices where RAM, not time, is short.
"""
from __future__ import annotations

import os
from itertools import chain
from typing import Tuple

import torch
from torch import Tensor, nn

LOW_MEMORY_SWITCH = "QUANT_NOISE_LOW_MEMORY"
_CACHE = "_qn_decoded"


def low_memory() -> bool:
    return os.environ.get(LOW_MEMORY_SWITCH, "0") == "1"


def version_key(module: nn.Module) -> Tuple:
    """Changes whenever one of the module's own tensors is replaced or written in place."""
    # the dicts directly: parameters(recurse=False) walks named_modules, ~4x the cost on every inference forward
    return tuple((t.data_ptr(), t._version) for t in chain(module._parameters.values(), module._buffers.values()) if t is not None)


def reusable(module: nn.Module) -> bool:
    """Inference: eval mode, no autograd, not in low-memory mode."""
    return not module.training and not torch.is_grad_enabled() and not low_memory()


def decoded(provider: nn.Module) -> Tensor:
    """``provider()``, built once per change of its tensors while ``reusable``; in training, every time."""
    if not reusable(provider):
        provider.__dict__.pop(_CACHE, None)  # training again: the dense copy is not kept
        return provider()
    key = version_key(provider)
    cached = provider.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    # torch.matmul folds a non-contiguous 3-D input into one mm only when the weight requires grad, as a dense
    # Parameter does; otherwise it runs a batched bmm, measured 8% slower on the quick LM's tied output
    # projection. So the cached weight is a plain tensor (not a view) flagged so, and takes the dense model's
    # kernels; under no_grad nothing is recorded.
    weight = provider().detach().requires_grad_(True)
    provider.__dict__[_CACHE] = (key, weight)
    return weight


def is_cached(provider: nn.Module) -> bool:
    return _CACHE in provider.__dict__
