"""Let ``torch.load(weights_only=True)`` (torch >= 2.6's default) read fairseq checkpoints.

fairseq stores the argparse Namespace of legacy-configured architectures (e.g. ``transformer``)
in ``cfg``; that is the one non-tensor class a checkpoint file needs. Under torch.distributed,
fairseq's ``load_checkpoint`` reads the file on rank 0 and sends the loaded state to the other ranks
through ``torch.save`` / ``torch.load``, by then with ``cfg`` as an omegaconf DictConfig and the tensors
replaced by fairseq's placeholders: the classes that state pickles to (found by loading it) are allowed
too, so that a multi-process run can start from a checkpoint. We allow exactly these classes instead of switching the unpickler's safety off.
"""
from __future__ import annotations

import argparse
import collections
import typing

import torch

CHECKPOINT_CLASSES = [argparse.Namespace]


def _broadcast_classes() -> list:
    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [_TensorPlaceholder, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode,
            typing.Any, dict, list, int, collections.defaultdict]


def allow_fairseq_checkpoint_classes() -> None:
    torch.serialization.add_safe_globals(CHECKPOINT_CLASSES + _broadcast_classes())
