"""Layer sharing by chunks (the paper's first compression): each chunk of N adjacent layers of a stack computes with
one set of weights, the chunk's first layer's.

The stack's ModuleList holds the same module object N times. Everything that walks modules then sees one weight:
the optimizer and ``torch.save`` (one storage), ``named_modules()`` (the first name only), the size accounting and the
packed file (one provider, one tensor on disk). The state dict still has every layer's keys, so a checkpoint of a
shared model loads into an unshared one of the same depth (stock fairseq: ``quant-noise unpack``) with the layers
expanded.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import QuantNoiseError

STACK_SIDES = ("encoder", "decoder")


def chunk_flag(side: str) -> str:
    return f"--{side}-share-layer-chunk"


def chunk_field(side: str) -> str:
    return f"{side}_share_layer_chunk"


def module_stacks(model: nn.Module) -> Dict[str, nn.ModuleList]:
    """{name: ModuleList} of the model's layer stacks: ``decoder.layers``, ``encoder.layers``,
    ``encoder.sentence_encoder.layers`` (RoBERTa). (pruning.layer_stacks reads the same stacks off a state dict's keys.)"""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.split(".")[0] in STACK_SIDES and name.endswith("layers")
            and name.count(".") <= 2}


def check_chunk(side: str, chunk: int, depth: int) -> None:
    if chunk < 1:
        raise QuantNoiseError(f"{chunk_flag(side)} {chunk}: must be >= 1 (1: every layer its own weights)")
    if depth % chunk:
        raise QuantNoiseError(f"{chunk_flag(side)} {chunk} does not divide the {depth} {side} layers (--{side}-layers): "
                              f"chunks of adjacent layers share, each of the same size")


def share_layers_(layers: nn.ModuleList, chunk: int) -> int:
    """Make each chunk of ``chunk`` adjacent layers one module (the chunk's first); returns the layers that now
    reuse another's weights."""
    reused = 0
    for index in range(len(layers)):
        first = index - index % chunk
        if layers[index] is not layers[first]:
            layers[index] = layers[first]
            reused += 1
    return reused


def share_stacks_(model: nn.Module, chunks: Dict[str, int]) -> Dict[str, int]:
    """``chunks``: {side: N} from the model config; shares the side's stack(s) by chunks of N (one-line error naming
    the flag for a bad N). Returns {stack name: layers reusing another's weights}."""
    stacks = module_stacks(model)
    done = {}
    for side, chunk in chunks.items():
        if chunk is None or chunk == 1:
            continue
        names = [name for name in stacks if name.split(".")[0] == side]
        if not names:
            raise QuantNoiseError(f"{chunk_flag(side)} {chunk}: this model has no {side} layer stack")
        for name in names:
            check_chunk(side, chunk, len(stacks[name]))
            done[name] = share_layers_(stacks[name], chunk)
    return done


def shared_chunks(layers: nn.ModuleList) -> List[Tuple[int, ...]]:
    """The stack's layers grouped by the module they are: [(0, 1), (2, 3)] for chunks of 2."""
    groups: Dict[int, List[int]] = {}
    for index in range(len(layers)):  # not iter(): fairseq's LayerDropModuleList skips layers at random in training
        groups.setdefault(id(layers[index]), []).append(index)
    return [tuple(indices) for indices in groups.values()]


def check_shared_keys_agree(model: nn.Module, state_dict, prefix: str = "") -> Optional[str]:
    """A state dict loaded into a shared model must hold the same values under every layer of a chunk (a checkpoint of
    a model trained without sharing would load its last layer silently). Returns the first key that disagrees, or None."""
    for stack_name, layers in module_stacks(model).items():
        for chunk in shared_chunks(layers):
            first = f"{prefix}{stack_name}.{chunk[0]}."
            keys = [k for k in state_dict if k.startswith(first)] if len(chunk) > 1 else []
            for other in chunk[1:]:
                for key in keys:
                    mine, theirs = state_dict[key], state_dict.get(f"{prefix}{stack_name}.{other}.{key[len(first):]}")
                    if theirs is None or mine is theirs or (
                            isinstance(mine, torch.Tensor) and mine.data_ptr() == theirs.data_ptr() and mine.shape == theirs.shape):
                        continue  # one tensor on disk, loaded as two views
                    if not isinstance(mine, torch.Tensor) or mine.shape != theirs.shape or not torch.equal(mine, theirs):
                        return f"{prefix}{stack_name}.{other}.{key[len(first):]}"
    return None
