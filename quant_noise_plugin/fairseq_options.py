"""The Quant-Noise options shared by the plugin's architectures and criterions.

(No ``from __future__ import annotations`` here: fairseq reads dataclass field types at runtime.)
"""

import argparse
from dataclasses import dataclass, field, fields
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

from .quant_noise import QuantNoiseConfig


HELP = {
    "pq": "Quant-Noise rate P for iPQ: fraction of weight blocks dropped each forward",
    "pq_block_size": "block size of the PQ noise (and of the later iPQ)",
    "scalar": "fraction of weights fake-quantized each forward (1 = QAT)",
    "scalar_bits": "bits of the scalar (fake) quantizer: 2, 3, 4 or 8",
    "scalar_per_channel": "scalar noise: one scale per output row instead of per tensor",
    "exclude": "regex searched anywhere in each module name (re.search, unlike the iPQ schedule's full match): "
               "matching modules get no noise, e.g. 'embed_tokens|output_projection'",
    "pq_embeddings": "PQ noise rate of embedding tables and the output projections tied to them (default: --quant-noise-pq)",
    "pq_centroids": "0: dropped blocks are zeroed (the paper's proxy); K>0: selected blocks are replaced by their nearest "
                    "of K centroids k-means'd from the layer's weight (the real iPQ error, straight-through)",
    "pq_refit_updates": "with --quant-noise-pq-centroids (or -schedule): refit the centroids every this many updates",
    "pq_schedule": "an iPQ schedule or `quant-noise plan` YAML: centroid noise with each layer's own block size and K from it "
                   "(the compression the model will get); layers it leaves out of PQ get no PQ noise",
    "activations": "fraction of each noised Linear's input fake-quantized to int8 each training forward (running "
                   "min-max range, straight-through): trains for int8 activations",
    "start_update": "no noise before this update (e.g. noise only in the last part of training)",
    "ramp_updates": "from --quant-noise-start-update, raise every rate linearly from 0 over this many updates",
}


@dataclass
class QuantNoiseExtraOptions(FairseqDataclass):
    """Options fairseq's own architectures lack (they define pq, pq-block-size and scalar)."""

    quant_noise_scalar_bits: int = field(default=8, metadata={"help": HELP["scalar_bits"]})
    quant_noise_scalar_per_channel: bool = field(default=False, metadata={"help": HELP["scalar_per_channel"]})
    quant_noise_exclude: Optional[str] = field(default=None, metadata={"help": HELP["exclude"]})
    quant_noise_pq_embeddings: Optional[float] = field(default=None, metadata={"help": HELP["pq_embeddings"]})
    quant_noise_pq_centroids: int = field(default=0, metadata={"help": HELP["pq_centroids"]})
    quant_noise_pq_refit_updates: int = field(default=100, metadata={"help": HELP["pq_refit_updates"]})
    quant_noise_pq_schedule: Optional[str] = field(default=None, metadata={"help": HELP["pq_schedule"]})
    quant_noise_activations: float = field(default=0.0, metadata={"help": HELP["activations"]})
    quant_noise_start_update: int = field(default=0, metadata={"help": HELP["start_update"]})
    quant_noise_ramp_updates: int = field(default=0, metadata={"help": HELP["ramp_updates"]})


SHARING_HELP = ("each chunk of N adjacent {side} layers computes with one set of weights (the chunk's first), stored and "
                "counted once: the paper's sharing by chunks, e.g. 2 (1: no sharing); N divides --{side}-layers")


@dataclass
class DecoderSharingOptions(FairseqDataclass):
    decoder_share_layer_chunk: int = field(default=1, metadata={"help": SHARING_HELP.format(side="decoder")})


@dataclass
class EncoderSharingOptions(FairseqDataclass):
    encoder_share_layer_chunk: int = field(default=1, metadata={"help": SHARING_HELP.format(side="encoder")})


# what stock fairseq configs lack
PLUGIN_MODEL_FIELDS = tuple(f.name for dc in (QuantNoiseExtraOptions, DecoderSharingOptions, EncoderSharingOptions) for f in fields(dc))


@dataclass
class QuantNoiseOptions(QuantNoiseExtraOptions):
    quant_noise_pq: float = field(default=0.0, metadata={"help": HELP["pq"]})
    quant_noise_pq_block_size: int = field(default=8, metadata={"help": HELP["pq_block_size"]})
    quant_noise_scalar: float = field(default=0.0, metadata={"help": HELP["scalar"]})


def set_missing_noise_defaults(args) -> None:
    """Architecture functions: the plugin's noise fields a config may lack (hydra, older checkpoints)."""
    for f in fields(QuantNoiseExtraOptions):
        if getattr(args, f.name, None) is None:
            setattr(args, f.name, f.default)


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

    qn_pq: float = field(default=0.0, metadata={"help": HELP["pq"]})
    qn_pq_block_size: int = field(default=8, metadata={"help": HELP["pq_block_size"]})
    qn_scalar: float = field(default=0.0, metadata={"help": HELP["scalar"]})
    qn_scalar_bits: int = field(default=8, metadata={"help": HELP["scalar_bits"]})
    qn_scalar_per_channel: bool = field(default=False, metadata={"help": HELP["scalar_per_channel"]})
    qn_exclude: Optional[str] = field(default=None, metadata={"help": HELP["exclude"]})
    qn_pq_embeddings: Optional[float] = field(default=None, metadata={"help": HELP["pq_embeddings"]})
    qn_pq_centroids: int = field(default=0, metadata={"help": HELP["pq_centroids"]})
    qn_pq_refit_updates: int = field(default=100, metadata={"help": HELP["pq_refit_updates"]})
    qn_pq_schedule: Optional[str] = field(default=None, metadata={"help": HELP["pq_schedule"]})
    qn_activations: float = field(default=0.0, metadata={"help": HELP["activations"]})
    qn_start_update: int = field(default=0, metadata={"help": HELP["start_update"]})
    qn_ramp_updates: int = field(default=0, metadata={"help": HELP["ramp_updates"]})


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

