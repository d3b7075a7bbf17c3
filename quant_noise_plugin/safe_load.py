"""Let ``torch.load(weights_only=True)`` (torch >= 2.6's default) read fairseq checkpoints.

fairseq stores the argparse Namespace of legacy-configured architectures (e.g. ``transformer``)
in ``cfg``; that is the one non-tensor class a checkpoint needs. We allow exactly that class
instead of switching the unpickler's safety off.
"""
from __future__ import annotations

import argparse

import torch

CHECKPOINT_CLASSES = [argparse.Namespace]


def allow_fairseq_checkpoint_classes() -> None:
    torch.serialization.add_safe_globals(CHECKPOINT_CLASSES)
