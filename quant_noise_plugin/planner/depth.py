"""Depth on the planner's menu: on a model trained with LayerDrop, keeping fewer layers frees bytes for the rest.

LayerDrop's authors prune every other layer (or evenly spaced ones) of a model trained with it, and fairseq prunes
that way (``--decoder-layers-to-keep``). The candidates here are those: every layer, every other layer, and where
the stack is deep enough every fourth; layers shared by chunks go by whole chunks. Each candidate is pruned in memory,
its calibration loss measured, and the same budget planned for it; the caller keeps the candidate with the lowest
predicted loss (the pruned model's loss plus its plan's estimated rise).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from ..sharing import module_stacks, shared_chunks


@dataclass
class DepthCandidate:
    stack: str  # e.g. "decoder.layers"
    kept: List[int]
    of: int

    @property
    def prunes(self) -> bool:
        return len(self.kept) < self.of

    def label(self) -> str:
        if not self.prunes:
            return f"all {self.of} layers of {self.stack}"
        return f"{self.stack} {','.join(map(str, self.kept))} of {self.of}"


def layerdrop_stack(model: nn.Module, layerdrop: dict) -> Optional[str]:
    """The one layer stack trained with LayerDrop (``layerdrop``: {side: rate} from the model config), or None."""
    stacks = [name for name in module_stacks(model) if (layerdrop.get(name.split(".")[0]) or 0) > 0]
    return stacks[0] if len(stacks) == 1 else None


def depth_candidates(model: nn.Module, stack: str) -> List[DepthCandidate]:
    """Every layer; every other unit (a layer, or a chunk of shared layers), from the first; every fourth where the
    stack has at least 8 units."""
    layers = model.get_submodule(stack)
    units = shared_chunks(layers)
    candidates = [DepthCandidate(stack, list(range(len(layers))), len(layers))]
    for step, least in ((2, 2), (4, 8)):
        if len(units) >= least:
            kept = [i for unit in units[::step] for i in unit]
            if kept not in [c.kept for c in candidates]:
                candidates.append(DepthCandidate(stack, kept, len(layers)))
    return candidates


def pruned_copy(model: nn.Module, candidate: DepthCandidate) -> nn.Module:
    """A copy of ``model`` with only the candidate's layers in its stack, renumbered 0..n-1 (what `quant-noise prune`
    writes, in memory); shared layers stay shared."""
    pruned = copy.deepcopy(model)
    owner_name, _, leaf = candidate.stack.rpartition(".")
    owner = pruned.get_submodule(owner_name)
    layers = owner._modules[leaf]
    kept = [layers[i] for i in candidate.kept]
    replacement = type(layers)(p=layers.p, modules=kept) if hasattr(layers, "p") else nn.ModuleList(kept)
    owner._modules[leaf] = replacement
    if hasattr(owner, "num_layers"):
        owner.num_layers = len(kept)
    return pruned
