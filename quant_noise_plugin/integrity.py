"""Checksums that let a packed file notice its own corruption (plain torch + zlib).

torch.save's zip container stores no checksum a reader verifies, so a flipped byte inside a tensor's
data loads without complaint and gives a slightly different model. A packed state dict therefore
carries one more entry, ``CHECKSUM_KEY``: an int64 tensor holding the CRC-32 of the sorted key list,
then one CRC-32 per key (over its dtype, shape and bytes). Every loader verifies it (the model's
``load_state_dict``, so fairseq's CLIs and the hub too) and names the first tensor that differs.
"""
from __future__ import annotations

import json
import logging
import zlib
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from .errors import QuantNoiseError

logger = logging.getLogger(__name__)
CHECKSUM_KEY = "_quant_noise_checksums"
PACKED_ONLY_SUFFIXES = ("codes_packed", "centroids_codes")  # keys only a packed file holds


class IntegrityError(QuantNoiseError):
    """A packed file whose bytes are not the ones it was written with."""


def tensor_crc32(tensor: Tensor) -> int:
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return zlib.crc32(data, zlib.crc32(header))


def _keys_crc32(keys) -> int:
    return zlib.crc32("\n".join(keys).encode())


def with_checksums(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``state_dict`` plus its checksum table (shared tensors stay shared)."""
    keys = sorted(k for k in state_dict if k != CHECKSUM_KEY)
    table = [_keys_crc32(keys)] + [tensor_crc32(state_dict[k]) for k in keys]
    out = {k: state_dict[k] for k in state_dict if k != CHECKSUM_KEY}
    out[CHECKSUM_KEY] = torch.tensor(table, dtype=torch.int64)
    return out


def looks_packed(state_dict: Mapping[str, Any]) -> bool:
    """A state dict only `quant-noise pack` writes: bit-packed codes, int centroids or fp16 centroids."""
    for key, value in state_dict.items():
        if key.endswith(PACKED_ONLY_SUFFIXES) or ".weight_int." in key:
            return True
        if key.endswith(".centroids") and isinstance(value, Tensor) and value.dtype == torch.float16:
            return True
    return False


_noticed = False


def notice_unverified(source: str) -> None:
    """One line per process for a file packed before checksums (a command reads it, then loads its model)."""
    global _noticed
    if not _noticed:
        _noticed = True
        logger.warning("%s: packed before checksums (quant-noise < format 2): its contents cannot be verified", source)


class VerifiedStateDict(dict):
    """A model state whose checksum table was verified, and removed, when its file was read (checkpoint_guard.py):
    the model's load_state_dict does not hash every tensor a second time."""


def pop_and_verify(state_dict: Dict[str, Any], source: str = "the checkpoint") -> Optional[bool]:
    """Remove the checksum table from ``state_dict`` (in place) and check every tensor against it.

    Returns True when verified (now, or at read: VerifiedStateDict), None when there is no table (a file packed
    before checksums, or not packed); raises IntegrityError naming ``source`` and the first key that differs.
    """
    if isinstance(state_dict, VerifiedStateDict):
        return True
    table = state_dict.pop(CHECKSUM_KEY, None)
    if table is None:
        return None
    keys = sorted(state_dict)
    if not isinstance(table, Tensor) or table.dtype != torch.int64 or table.dim() != 1:
        raise IntegrityError(f"{source}: its checksum table is damaged; re-copy or re-pack the file")
    stored = table.tolist()
    if len(stored) != len(keys) + 1 or stored[0] != _keys_crc32(keys):
        raise IntegrityError(f"{source}: its tensor names or count differ from those it was packed with "
                             f"({len(keys)} tensors, {len(stored) - 1} recorded); re-copy or re-pack the file")
    for key, crc in zip(keys, stored[1:]):
        value = state_dict[key]
        if not isinstance(value, Tensor) or tensor_crc32(value) != crc:
            raise IntegrityError(f"{source}: tensor {key} fails its checksum (corrupted on disk or in transfer); re-copy or re-pack the file")
    return True


def config_crc32(state: Mapping[str, Any], exclude: tuple = ("model", "last_optimizer_state")) -> int:
    """CRC-32 of everything beside the tensors (cfg, task state with the iPQ schedule, ...), canonical JSON."""
    rest = {k: v for k, v in state.items() if k not in exclude}
    return zlib.crc32(json.dumps(rest, sort_keys=True, default=repr).encode())
