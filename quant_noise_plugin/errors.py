"""One-line errors: the plugin's error type, and how fairseq's commands print it.

fairseq's CLIs (fairseq-train, fairseq-eval-lm, ...) let every exception end in a traceback. The
plugin's own errors already say what is wrong and what to do, in one line naming the culprit, so
``install_one_line_errors`` (run when ``--user-dir`` imports the plugin) prints those as
``<command>: error: <message>`` instead; a checkpoint file torch cannot read is reported the same
way, naming the file. Every other exception keeps fairseq's traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Optional


class QuantNoiseError(ValueError):
    """A problem the user can fix: the message names the file, flag, YAML key or layer, and what to do."""


def _checkpoint_arg() -> str:
    """The checkpoint a fairseq command was given (``--path``, ``--restore-file``, ``--finetune-from-model``)."""
    argv = sys.argv
    for flag in ("--path", "--finetune-from-model", "--restore-file"):
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return "the checkpoint"


def one_line_message(exc: BaseException) -> Optional[str]:
    """The one-line message for errors the plugin explains; None for every other exception.

    fairseq sometimes re-raises a generic error while handling ours ("Cannot load model parameters
    from checkpoint ..."): the chain is searched, ours first.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for exc in chain:
        if isinstance(exc, QuantNoiseError):
            return _own_message(exc)
    for exc in chain:
        message = _known_failure(exc)
        if message:
            return message
    return None


def _own_message(exc: QuantNoiseError) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def unreadable_checkpoint_message(path, reason: str) -> str:
    """What a checkpoint torch cannot unpickle is (one line; the guard and the CLIs' last resort say the same)."""
    return f"{path}: not a readable torch checkpoint ({reason}): the file is truncated or corrupted; re-create or re-copy it"


def _known_failure(exc: BaseException) -> Optional[str]:
    """fairseq/torch failures with a cause the user can fix, said in one line."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and "PytorchStreamReader failed" in text:  # torch.load of a damaged zip
        reason = text.split(". ", 1)[0]
        return unreadable_checkpoint_message(_checkpoint_arg(), reason)
    if "Could not infer language pair" in text:  # fairseq's translation task on a directory without language-pair files
        return (f"{_checkpoint_arg()}: a translation model, but its data directory has no language-pair files "
                f"(train.SRC-TGT.SRC.bin ...): give the translation data it was trained on")
    return None


def install_one_line_errors() -> None:
    """Print the plugin's errors as one line (and the rest as before) in the current process."""
    if getattr(sys.excepthook, "_quant_noise", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        message = one_line_message(exc) if exc is not None else None
        if message is None:
            return previous(exc_type, exc, tb)
        sys.stdout.flush()
        print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {message}", file=sys.stderr, flush=True)

    hook._quant_noise = True
    sys.excepthook = hook
