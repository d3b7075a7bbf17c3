"""fairseq's checkpoint reads and writes, made to notice damage and to fail in one line.

fairseq reads every checkpoint through ``checkpoint_utils.load_checkpoint_to_cpu`` (its CLIs, the hub,
training's ``--restore-file`` / ``--finetune-from-model``) and writes training checkpoints through
``checkpoint_utils._torch_persistent_save``. Installed when ``--user-dir`` imports the plugin, the two
wrappers below add what a trusted format has:

- reading: a file whose pickle cannot be read is a one-line error naming it; the pickle (config, tensor
  names) is checked against the CRC-32 the zip archive holds for it (torch.load never checks it); a packed
  file's config and tensors are verified against its checksums before fairseq sees it;
  a training checkpoint of a plugin architecture is verified against the checksums it was saved with;
- writing: the training checkpoints of plugin architectures carry a checksum table of their model
  tensors (``integrity.CHECKSUM_KEY``, popped again by every loader); a full disk or a file-size limit is
  a one-line error, and the partial temporary file is removed (fairseq renames it into place only
  when whole, so the previous checkpoint stays).
"""
from __future__ import annotations

import functools
import os
import traceback
import zipfile
from typing import Any, Dict

from .checkpoints import (PACKED_MARKER, PLUGIN_ARCHS, CheckpointError, _model_family, check_pickle_crc, is_write_failure, model_name,
                          read_checkpoint, write_failure_message)
from .errors import QuantNoiseError, unreadable_checkpoint_message
from .integrity import CHECKSUM_KEY, VerifiedStateDict, pop_and_verify, with_checksums

_UNPICKLING_FILES = (os.path.join("torch", "serialization.py"), "_weights_only_unpickler.py", "pickle.py", "zipfile")


def install_checkpoint_guard() -> None:
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.load_checkpoint_to_cpu, "_quant_noise", False):
        return
    checkpoint_utils.load_checkpoint_to_cpu = _guarded_load(checkpoint_utils.load_checkpoint_to_cpu)
    checkpoint_utils._torch_persistent_save = _guarded_save(checkpoint_utils._torch_persistent_save)


def _raised_while_unpickling(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return any(any(part in frame.filename for part in _UNPICKLING_FILES) for frame in frames)


def _guarded_load(original):
    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        verified = False
        if isinstance(path, (str, os.PathLike)) and zipfile.is_zipfile(path):  # (legacy non-zip files: fairseq's read)
            if PACKED_MARKER.encode() in check_pickle_crc(path):  # the pickle alone: tensors are other zip members
                read_checkpoint(path)  # a packed file: config and tensors against its checksums, errors naming the file
                verified = True
        try:
            state = original(path, *args, **kwargs)
        except QuantNoiseError:
            raise
        except Exception as e:
            if not _raised_while_unpickling(e):
                raise
            reason = ((str(e).splitlines() or [""])[0].split(". ", 1)[0][:200]) or type(e).__name__
            raise CheckpointError(unreadable_checkpoint_message(path, reason)) from None
        model = state.get("model") if isinstance(state, dict) else None
        if isinstance(model, dict) and CHECKSUM_KEY in model:
            if verified:
                model.pop(CHECKSUM_KEY)
            else:
                pop_and_verify(model, str(path))
            state["model"] = VerifiedStateDict(model)  # the model's load_state_dict need not verify it again
        return state

    load_checkpoint_to_cpu._quant_noise = True
    return load_checkpoint_to_cpu


def _is_plugin_checkpoint(obj: Any) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        return False
    cfg = obj.get("cfg") or {}
    if not isinstance(cfg, dict):
        return False
    try:
        return _model_family(model_name(cfg)) in PLUGIN_ARCHS.values()
    except Exception:
        return False


def with_model_checksums(obj: Dict[str, Any]) -> Dict[str, Any]:
    """A training checkpoint of a plugin architecture, its model tensors checksummed (others as they are)."""
    if _is_plugin_checkpoint(obj) and CHECKSUM_KEY not in obj["model"]:
        obj = {**obj, "model": with_checksums(obj["model"])}
    return obj


def _guarded_save(original):
    @functools.wraps(original)
    def _torch_persistent_save(obj, f):
        if isinstance(f, str):  # fairseq opens the path and comes back with a handle
            return original(obj, f)
        import torch

        obj = with_model_checksums(obj)
        try:
            return torch.save(obj, f)
        except (OSError, RuntimeError) as e:
            name = str(getattr(f, "name", "the checkpoint"))
            if not is_write_failure(e):
                f.seek(0)
                f.truncate()
                return original(obj, f)  # fairseq's retries (network file systems)
            try:
                f.truncate(0)
                os.unlink(name)
            except OSError:
                pass
            target = name[: -len(".tmp")] if name.endswith(".tmp") else name
            raise CheckpointError(write_failure_message(target)) from None

    _torch_persistent_save._quant_noise = True
    return _torch_persistent_save
