"""Reading and writing fairseq checkpoints safely: one-line errors, atomic writes, cfg rewrites."""
from __future__ import annotations

import argparse
import errno
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .atomic import atomic_file
from .errors import QuantNoiseError
from .integrity import IntegrityError, config_crc32, notice_unverified, pop_and_verify
from .safe_load import allow_fairseq_checkpoint_classes

PACKED_MARKER = "quant_noise"  # top-level key of packed checkpoints: {"packed": True, "format": 2, "config_crc32": ...}
PACKED_FORMAT = 2  # 2: the state dict carries integrity.CHECKSUM_KEY and the marker the config's CRC-32
PLUGIN_ARCHS = {"transformer_lm": "qn_transformer_lm", "transformer": "qn_transformer", "roberta": "qn_roberta"}  # stock model -> plugin twin
PLUGIN_TASKS = {"language_modeling": "ipq_language_modeling", "translation": "ipq_translation", "masked_lm": "ipq_masked_lm",
                "sentence_prediction": "ipq_sentence_prediction"}
PLUGIN_CRITERIONS = {"cross_entropy": "qn_cross_entropy", "label_smoothed_cross_entropy": "qn_label_smoothed_cross_entropy",
                     "masked_lm": "qn_masked_lm", "sentence_prediction": "qn_sentence_prediction"}


class CheckpointError(QuantNoiseError):
    """A checkpoint that cannot be used: the message names the file and says what to do."""


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """torch.load with weights_only=True (fairseq's classes allow-listed), with readable errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch checkpoint (truncated or corrupted?); re-create or re-copy it")
    check_pickle_crc(path)
    allow_fairseq_checkpoint_classes()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip member, an unknown class...
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsafe:  # refused by the allow-list, never unpickled
            raise CheckpointError(f"{path}: holds a {unsafe.group(1)} object, which the safe loader (weights_only=True) refuses: "
                                  f"not a fairseq or quant-noise checkpoint") from None
        raise CheckpointError(f"{path}: cannot be read ({str(e).splitlines()[0][:200]}); re-create or re-copy it") from None
    if not isinstance(state, dict) or "model" not in state or ("cfg" not in state and "args" not in state):
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no model/cfg entries)")
    if is_packed(state):
        verify_packed(state, str(path))  # the table stays: the model's load_state_dict pops it
    elif isinstance(state["model"], dict):
        pop_and_verify(state["model"], str(path))  # a training checkpoint of a plugin arch (checkpoint_guard.py)
    return state


def check_pickle_crc(path: str | Path) -> bytes:
    """The archive's pickle (config, tensor names) against the CRC-32 torch.save writes for it and torch.load never
    checks: a flipped byte there could change a config value silently. Returns the pickle's bytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if name is None:
                raise CheckpointError(f"{path}: not a torch checkpoint (no data.pkl in the archive)")
            return archive.read(name)  # zipfile verifies the member's CRC-32
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile (bad CRC-32, bad header), zlib or struct errors of a damaged archive
        raise CheckpointError(f"{path}: damaged archive ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); re-create or re-copy it") from None


def packed_config_crc32(state: Dict[str, Any]) -> int:
    """CRC-32 of a packed file's non-tensor entries (cfg, iPQ schedule, the marker but its own CRC)."""
    rest = dict(state)
    rest[PACKED_MARKER] = {k: v for k, v in state[PACKED_MARKER].items() if k != "config_crc32"}
    return config_crc32(rest)


def verify_packed(state: Dict[str, Any], source: str) -> None:
    """Check a packed file's config and tensors against its checksums (the state is left as it is: the
    model's load checks the tensors again, as it does under fairseq's CLIs); a file packed before
    checksums gets a one-line notice."""
    marker = state[PACKED_MARKER]
    if "config_crc32" not in marker:
        notice_unverified(source)
        return
    if packed_config_crc32(state) != marker["config_crc32"]:
        raise IntegrityError(f"{source}: its config or schedule fails its checksum (corrupted?); re-copy or re-pack the file")
    if pop_and_verify(dict(state["model"]), source) is None:
        raise IntegrityError(f"{source}: its tensors' checksum table is missing; re-copy or re-pack the file")


def is_write_failure(exc: BaseException) -> bool:
    """torch.save stopped by the file system: a full disk or a file-size limit (torch's zip writer reports a
    short write as a RuntimeError 'unexpected pos'; Python's writes as an OSError)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)


def write_failure_message(path: str | Path) -> str:
    return (f"{path}: cannot be written (the disk is full or a file-size limit is set); free space and rerun "
            f"(no partial file is left; a previous {Path(path).name} is kept)")


def write_checkpoint_atomically(state: Dict[str, Any], path: str | Path) -> int:
    """Write next to ``path`` then rename, so a crash never leaves a half-written file. Returns bytes.

    Saved through an open file: torch then names the zip records "archive/..." instead of after the (temporary)
    file, so a file's size does not depend on its name (sizes.serialized_bytes counts it exactly)."""
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        if is_write_failure(e):
            raise CheckpointError(write_failure_message(path)) from None
        raise
    return Path(path).stat().st_size


def is_packed(state: Dict[str, Any]) -> bool:
    return bool(state.get(PACKED_MARKER, {}).get("packed"))


def _get(node, key, default=None):
    if isinstance(node, argparse.Namespace):
        return getattr(node, key, default)
    return node.get(key, default) if node is not None else default


def _set(node, key, value) -> None:
    if isinstance(node, argparse.Namespace):
        setattr(node, key, value)
    else:
        node[key] = value


def model_name(cfg: Dict[str, Any]) -> Optional[str]:
    model = cfg.get("model")
    return _get(model, "_name") or _get(model, "arch")


def _model_family(name: Optional[str]) -> Optional[str]:
    """The registered model an architecture belongs to (arch presets such as qn_transformer_lm_small included)."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return ARCH_MODEL_NAME_REGISTRY.get(name, name)


def use_plugin_names(cfg: Dict[str, Any]) -> None:
    """Point a checkpoint's cfg at the plugin architecture, which reloads compressed layers.

    The saved config holds every architecture field explicitly, so the base plugin arch with
    those fields builds the same model as the preset it came from.
    """
    name = model_name(cfg)
    family = _model_family(name)
    if family in PLUGIN_ARCHS:
        _set(cfg["model"], "_name", PLUGIN_ARCHS[family])
        _set(cfg["model"], "arch", PLUGIN_ARCHS[family])
    elif family not in PLUGIN_ARCHS.values():
        raise CheckpointError(
            f"architecture {name!r} has no plugin twin that can reload compressed layers "
            f"(supported: {', '.join(sorted(PLUGIN_ARCHS))} and their qn_ twins)"
        )


def without_namespaces(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The cfg with each argparse.Namespace section as a plain dict (legacy archs store one for the model).

    torch's safe loader refuses a Namespace unless it is allow-listed, which the plugin does but stock
    fairseq does not; plain dicts load anywhere, and fairseq builds legacy models from them as well.
    """
    return {k: dict(vars(v)) if isinstance(v, argparse.Namespace) else v for k, v in cfg.items()}


def _coerce(dc, key: str, value):
    """Legacy arch functions store False in some Optional[int] fields (base_shuffle); dataclasses reject that."""
    field = dc.__dataclass_fields__.get(key)
    if field is not None and isinstance(value, bool) and "int" in str(field.type) and "bool" not in str(field.type):
        return int(value)
    return value


def use_stock_names(cfg: Dict[str, Any]) -> None:
    """Rewrite a cfg for stock fairseq: stock arch/task/criterion names, no plugin-only keys."""
    from fairseq.models import MODEL_DATACLASS_REGISTRY

    stock_arch = {v: k for k, v in PLUGIN_ARCHS.items()}
    model = cfg["model"]
    fields = vars(model) if isinstance(model, argparse.Namespace) else dict(model)
    name = fields.get("_name") or fields.get("arch")
    name = stock_arch.get(_model_family(name), name)
    from .fairseq_options import PLUGIN_MODEL_FIELDS

    fields = {k: v for k, v in fields.items() if k not in PLUGIN_MODEL_FIELDS}
    fields["_name"] = name
    if "arch" in fields:
        fields["arch"] = name
    dc = MODEL_DATACLASS_REGISTRY.get(name)
    if dc is not None:  # dataclass models reject unknown keys, and check types
        fields = {k: _coerce(dc, k, v) for k, v in fields.items() if k in dc.__dataclass_fields__ or k == "_name"}
    cfg["model"] = fields  # a plain dict: stock torch.load (weights_only) cannot read a Namespace
    stock_task = {v: k for k, v in PLUGIN_TASKS.items()}
    task = cfg.get("task")
    if task is not None:
        task = vars(task) if isinstance(task, argparse.Namespace) else dict(task)
        task["_name"] = stock_task.get(task.get("_name"), task.get("_name"))
        for key in [k for k in task if k.startswith("ipq_")] + ["max_update", "restore_file", "reset_optimizer", "save_dir",
                                                                   "finetune_from_model"]:
            task.pop(key, None)  # every iPQ option (a stock task's dataclass rejects unknown keys), present and future
        cfg["task"] = task
    stock_criterion = {v: k for k, v in PLUGIN_CRITERIONS.items()}
    criterion = cfg.get("criterion")
    if criterion is not None:
        criterion = dict(criterion)
        criterion["_name"] = stock_criterion.get(criterion.get("_name"), criterion.get("_name"))
        cfg["criterion"] = {k: v for k, v in criterion.items() if not k.startswith("qn_")}
