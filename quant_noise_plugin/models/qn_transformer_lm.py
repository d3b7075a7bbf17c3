"""``qn_transformer_lm``: fairseq's transformer_lm with the plugin's Quant-Noise.

Same modules, parameters and state_dict keys as ``transformer_lm`` (no extra layer is added);
with the noise off it is the same model.

Registered the legacy (argparse-namespace) way on purpose: fairseq hands such models the very
config object that ``FairseqTask.build_model`` later passes to its own scalar quantizer, so zeroing
fairseq's built-in rates in ``build_model`` really keeps fairseq's noise from firing (a
dataclass-registered model only ever sees a merged copy).
"""
import dataclasses
from dataclasses import dataclass

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_baevski_wiki103,
    transformer_lm_gpt2_tiny,
)

from ..errors import QuantNoiseError
from ..fairseq_options import DecoderSharingOptions, QuantNoiseExtraOptions, set_missing_noise_defaults
from .compressed_loading import CompressedLoadingMixin
from .eval_guard import EvalLengthGuardMixin
from .noised_model import QuantNoiseModelMixin, set_defaults


@dataclass
class QNTransformerLanguageModelConfig(TransformerLanguageModelConfig, QuantNoiseExtraOptions, DecoderSharingOptions):
    pass


@register_model("qn_transformer_lm")
class QNTransformerLanguageModel(EvalLengthGuardMixin, QuantNoiseModelMixin, CompressedLoadingMixin, TransformerLanguageModel):
    @staticmethod
    def architecture_defaults(args):
        qn_base_lm_architecture(args)

    @classmethod
    def add_args(cls, parser):
        gen_parser_from_dataclass(parser, QNTransformerLanguageModelConfig(), delete_default=True)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_projection_dims(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def check_projection_dims(model, state_dict) -> None:
    """A stock transformer_lm narrower than 512 keeps 512-wide input/output dims and two projections;
    ours follows --decoder-embed-dim unless told: say which flags load such a checkpoint."""
    decoder = model.decoder
    for side, flag in (("in", "input"), ("out", "output")):
        key = f"decoder.project_{side}_dim.weight"
        theirs, ours = state_dict.get(key), getattr(decoder, f"project_{side}_dim", None)
        if (theirs is None) == (ours is None):
            continue
        if theirs is not None:
            width = theirs.shape[1] if side == "in" else theirs.shape[0]
            fix = f"pass --decoder-input-dim {width} --decoder-output-dim {width} (transformer_lm's defaults are 512)"
        else:
            fix = "its --decoder-input-dim/--decoder-output-dim equal --decoder-embed-dim: drop those flags"
        raise QuantNoiseError(f"the checkpoint's decoder {flag} projection does not match this model's: {fix}")


def _set_missing(args, name, value):
    if getattr(args, name, None) is None:
        setattr(args, name, value)


@register_model_architecture("qn_transformer_lm", "qn_transformer_lm")
def qn_base_lm_architecture(args):
    """Exactly ``--arch transformer_lm``'s defaults (its dataclass'), not base_lm_architecture's.

    One difference: input/output dims follow --decoder-embed-dim unless given; transformer_lm keeps
    them at 512 whatever the width, adding two projections (so at --decoder-embed-dim 128 it has
    12.75M parameters on the KJV vocabulary, this arch 3.45M). ``--decoder-input-dim 512
    --decoder-output-dim 512`` makes the two the same model.
    """
    embed_dim = getattr(args, "decoder_embed_dim", None) or 512
    _set_missing(args, "decoder_input_dim", embed_dim)
    _set_missing(args, "decoder_output_dim", embed_dim)
    for f in dataclasses.fields(TransformerLanguageModelConfig):
        if hasattr(args, f.name) and getattr(args, f.name) is not None:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING or (isinstance(default, str) and default.startswith("${")):
            continue
        setattr(args, f.name, default)
    set_missing_noise_defaults(args)


@register_model_architecture("qn_transformer_lm", "qn_transformer_lm_wiki103")
def qn_transformer_lm_wiki103(args):
    """The paper's 16-layer WikiText-103 LM (Baevski & Auli adaptive inputs)."""
    transformer_lm_baevski_wiki103(args)
    set_missing_noise_defaults(args)


@register_model_architecture("qn_transformer_lm", "qn_transformer_lm_gpt2_tiny")
def qn_transformer_lm_gpt2_tiny(args):
    transformer_lm_gpt2_tiny(args)
    set_missing_noise_defaults(args)


@register_model_architecture("qn_transformer_lm", "qn_transformer_lm_small")
def qn_transformer_lm_small(args):
    """A CPU-sized LM for the demo: 4 layers, 256 wide, tied input/output embeddings."""
    set_defaults(args, decoder_layers=4, decoder_embed_dim=256, decoder_ffn_embed_dim=1024, decoder_attention_heads=4,
                 share_decoder_input_output_embed=True)
    base_lm_architecture(args)
    set_missing_noise_defaults(args)
