"""Layer pruning after LayerDrop, as a step of its own (``quant-noise prune``): a checkpoint with some layers of a
stack kept, renumbered, and a config that says its new depth, so that every fairseq command loads it with no override.

fairseq prunes only at load time (``--decoder-layers-to-keep``, which every later command must repeat); its users
report pruned checkpoints that do not load. Here the state dict itself loses the dropped layers: a dense checkpoint
(the trained model, before iPQ) or a packed file (its checksums and config CRC recomputed) alike. Works on the state
dict's keys, with no model built: ``<stack>.layers.<i>.*``.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .checkpoints import PACKED_MARKER, CheckpointError, _get, _set, is_packed, packed_config_crc32
from .integrity import pop_and_verify, with_checksums
from .sharing import chunk_field, chunk_flag

_LAYER_KEY = re.compile(r"^(?P<stack>(?:[\w]+\.)*?)layers\.(?P<index>\d+)\.(?P<rest>.+)$")


def layer_stacks(model_state: Dict[str, Any]) -> Dict[str, int]:
    """{stack prefix (e.g. "decoder.", "encoder.sentence_encoder."): its number of layers} in a model state dict."""
    depth: Dict[str, int] = {}
    for key in model_state:
        match = _LAYER_KEY.match(key)
        if match:
            stack = match["stack"]
            depth[stack] = max(depth.get(stack, 0), int(match["index"]) + 1)
    return depth


def parse_keep(text: str) -> List[int]:
    """``--keep 0,2,4,6`` as a list of layer indices; a one-line error naming the flag otherwise."""
    try:
        keep = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CheckpointError(f"--keep {text!r}: layer indices separated by commas, e.g. 0,2,4,6") from None
    if not keep:
        raise CheckpointError("--keep: no layer given; name the layers to keep, e.g. 0,2,4,6")
    return keep


def _check_keep(keep: Sequence[int], depth: int, stack: str) -> None:
    bad = [i for i in keep if not 0 <= i < depth]
    if bad:
        raise CheckpointError(f"--keep {','.join(map(str, keep))}: layer {bad[0]} is out of range: {stack}layers has {depth} (0 to {depth - 1})")
    if sorted(set(keep)) != list(keep):
        raise CheckpointError(f"--keep {','.join(map(str, keep))}: give each layer once, in increasing order")


def _check_whole_chunks(keep: Sequence[int], stack: str, chunk: int) -> None:
    """Layers shared by chunks go or stay together: keeping part of a chunk keeps all of its weights."""
    if chunk == 1:
        return
    kept = set(keep)
    for first in sorted({i - i % chunk for i in keep}):
        if not set(range(first, first + chunk)) <= kept:
            side = stack.split(".")[0]
            raise CheckpointError(
                f"--keep {','.join(map(str, keep))}: splits the shared chunks of {stack}layers ({chunk_flag(side)} {chunk}: layers "
                f"{first}-{first + chunk - 1} share one set of weights); keep or drop whole chunks, e.g. "
                f"{','.join(map(str, range(first, first + chunk)))}")


def _config_key(stack: str) -> str:
    """The model config's depth key of a stack: decoder_layers, or encoder_layers (RoBERTa's sentence encoder too)."""
    return f"{stack.split('.')[0]}_layers"


def prune_checkpoint(state: Dict[str, Any], keep: Sequence[int], stack: Optional[str] = None,
                     source: str = "the checkpoint") -> Tuple[Dict[str, Any], str, int]:
    """A copy of ``state`` with only the layers ``keep`` of ``stack`` (the only stack when None), renumbered 0..n-1;
    with the stack's prefix and its depth before."""
    model = dict(state["model"])
    # a checksummed state (packed, or a plugin training checkpoint) is verified, then checksummed anew once renamed
    checksummed = pop_and_verify(model, source) is not None or is_packed(state)
    task_state = state.get("task_state")
    if isinstance(task_state, dict) and any(k.startswith("ipq_") for k in task_state):
        raise CheckpointError(f"{source}: an iPQ training checkpoint (its schedule names layers): prune the trained model "
                              "before iPQ, or the packed file after it")
    stacks = layer_stacks(model)
    named = ", ".join(s + "layers" for s in stacks)
    if stack is None:
        if not stacks:
            raise CheckpointError(f"{source}: no layer stack (no <stack>.layers.<i>. keys) to prune")
        if len(stacks) > 1:
            raise CheckpointError(f"{source}: stacks {named}: name one with --stack, e.g. --stack {next(iter(stacks)).rstrip('.')}")
        stack = next(iter(stacks))
    else:
        stack = stack if stack.endswith(".") else stack + "."
        if stack not in stacks:
            raise CheckpointError(f"--stack {stack.rstrip('.')}: {source} has no {stack}layers (it has {named})")
    _check_keep(keep, stacks[stack], stack)
    if _get(state["cfg"].get("model"), _config_key(stack)) is None:
        raise CheckpointError(f"{source}: its model config has no {_config_key(stack)} to set")
    _check_whole_chunks(keep, stack, _get(state["cfg"]["model"], chunk_field(stack.split(".")[0])) or 1)
    new_index = {old: new for new, old in enumerate(keep)}
    pruned = {}
    for key, value in model.items():
        match = _LAYER_KEY.match(key)
        if match and match["stack"] == stack:
            index = int(match["index"])
            if index in new_index:
                pruned[f"{stack}layers.{new_index[index]}.{match['rest']}"] = value
        else:
            pruned[key] = value
    out = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    out["model"] = with_checksums(pruned) if checksummed else pruned
    out["cfg"] = copy.deepcopy(state["cfg"])
    model_cfg = out["cfg"]["model"]
    _set(model_cfg, _config_key(stack), len(keep))
    _set(model_cfg, f"{_config_key(stack)}_to_keep", None)  # fairseq would prune again at load
    if is_packed(state):
        out[PACKED_MARKER] = {**state[PACKED_MARKER], "pruned": {"stack": stack.rstrip("."), "kept": list(keep), "of": stacks[stack]}}
        out[PACKED_MARKER]["config_crc32"] = packed_config_crc32(out)
    return out, stack, stacks[stack]
