"""The Quant-Noise options shared by the plugin's architectures and criterions.

(No ``from __future__ import annotations`` here: fairseq reads dataclass field types at runtime.)
"""

import argparse
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from .quant_noise import QuantNoiseConfig


@dataclass
class QuantNoiseExtraOptions(FairseqDataclass):
    """Options fairseq's own architectures lack (they define pq, pq-block-size and scalar)."""

    quant_noise_scalar_bits: int = field(default=8, metadata={"help": "bits of the scalar (fake) quantizer: 4 or 8"})
    quant_noise_scalar_per_channel: bool = field(
        default=False, metadata={"help": "scalar noise: one scale per output row instead of per tensor"}
    )
    quant_noise_exclude: Optional[str] = field(
        default=None, metadata={"help": "regex over module names that get no noise, e.g. 'embed_tokens|output_projection'"}
    )


@dataclass
class QuantNoiseOptions(QuantNoiseExtraOptions):
    quant_noise_pq: float = field(default=0.0, metadata={"help": "Quant-Noise rate P for iPQ: fraction of weight blocks dropped each forward"})
    quant_noise_pq_block_size: int = field(default=8, metadata={"help": "block size of the PQ noise (and of the later iPQ)"})
    quant_noise_scalar: float = field(default=0.0, metadata={"help": "fraction of weights fake-quantized each forward (1 = QAT)"})


def add_missing_args(parser: argparse.ArgumentParser, dataclass_instance: FairseqDataclass) -> None:
    """Add the dataclass' options that ``parser`` does not know yet (architectures' extra flags)."""
    scratch = argparse.ArgumentParser(add_help=False)
    gen_parser_from_dataclass(scratch, dataclass_instance)
    known = set(parser._option_string_actions)  # argparse keeps no public view of its options
    for action in scratch._actions:
        if action.option_strings and not set(action.option_strings) & known:
            parser._add_action(action)


@dataclass
class CriterionNoiseOptions(FairseqDataclass):
    """The criterions' noise options: same command-line flags, ``qn_``-prefixed config fields.

    fairseq's argparse namespace is flat and fills the model config from it by field name, so a
    criterion field called ``quant_noise_pq`` would also reach fairseq's own transformer/lstm code
    (which then adds its extra Linear, in-place hooks and CUDA-only scalar quantizer). Distinct
    field names keep the model config clean; see ``add_criterion_noise_args`` for the flags.
    """

    qn_pq: float = field(default=0.0, metadata={"help": QuantNoiseOptions.__dataclass_fields__["quant_noise_pq"].metadata["help"]})
    qn_pq_block_size: int = field(default=8, metadata={"help": "block size of the PQ noise (and of the later iPQ)"})
    qn_scalar: float = field(default=0.0, metadata={"help": "fraction of weights fake-quantized each forward (1 = QAT)"})
    qn_scalar_bits: int = field(default=8, metadata={"help": "bits of the scalar (fake) quantizer: 4 or 8"})
    qn_scalar_per_channel: bool = field(default=False, metadata={"help": "scalar noise: one scale per output row"})
    qn_exclude: Optional[str] = field(default=None, metadata={"help": "regex over module names that get no noise"})


CRITERION_PREFIX = "qn_"


def add_criterion_noise_args(parser: argparse.ArgumentParser) -> None:
    """Give the criterion the ``--quant-noise-*`` flags, taking them over from the architecture.

    When the architecture defines the same flag (fairseq's transformer_lm has --quant-noise-pq),
    the criterion takes it over, as argparse's conflict_handler="resolve" would: the value then
    feeds the criterion's ``qn_*`` field only, and the model is built without fairseq's noise.
    """
    scratch = argparse.ArgumentParser(add_help=False)
    gen_parser_from_dataclass(scratch, CriterionNoiseOptions())
    for action in scratch._actions:
        if not action.option_strings:
            continue
        flag = "--quant-noise-" + action.dest[len(CRITERION_PREFIX):].replace("_", "-")
        owner = parser._option_string_actions.get(flag)
        if owner is not None:
            parser._handle_conflict_resolve(None, [(flag, owner)])
        action.option_strings = [flag]
        parser._add_action(action)


def noise_config_of(cfg, prefix: str = "quant_noise_") -> QuantNoiseConfig:
    return QuantNoiseConfig.from_fairseq_cfg(cfg, prefix)


def disable_fairseq_builtin_noise(cfg) -> None:
    """Zero fairseq's own noise rates in a model config so fairseq's code never applies them.

    fairseq's Transformer adds an extra Linear when quant_noise_pq > 0 and
    ``FairseqTask.build_model`` swaps in its scalar IntLinear when quant_noise_scalar > 0, both
    reading the model config; the plugin applies the noise itself (see quant_noise.py).
    """
    from omegaconf import DictConfig, open_dict

    def zero():
        for name in ("quant_noise_pq", "quant_noise_scalar"):
            if getattr(cfg, name, None):
                setattr(cfg, name, 0.0)

    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            zero()
    else:
        zero()

