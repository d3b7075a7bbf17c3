"""``qn_transformer``: fairseq's encoder-decoder transformer with the plugin's Quant-Noise."""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer.transformer_legacy import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
)

from ..errors import QuantNoiseError, _checkpoint_arg
from ..fairseq_options import DecoderSharingOptions, EncoderSharingOptions, QuantNoiseExtraOptions, add_missing_args
from .compressed_loading import CompressedLoadingMixin
from .noised_model import QuantNoiseModelMixin, set_defaults


@register_model("qn_transformer")
class QNTransformerModel(QuantNoiseModelMixin, CompressedLoadingMixin, TransformerModel):
    architecture_defaults = staticmethod(base_architecture)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        for options in (QuantNoiseExtraOptions(), EncoderSharingOptions(), DecoderSharingOptions()):
            add_missing_args(parser, options)

    @classmethod
    def build_model(cls, args, task):
        from fairseq.tasks.language_modeling import LanguageModelingTask

        if isinstance(task, LanguageModelingTask):  # fairseq-eval-lm given a translation checkpoint
            raise QuantNoiseError(f"{_checkpoint_arg()}: a translation model (qn_transformer) cannot be evaluated as a language model; "
                                  f"use fairseq-generate or fairseq-validate with its translation data")
        return super().build_model(args, task)


@register_model_architecture("qn_transformer", "qn_transformer")
def qn_base_architecture(args):
    base_architecture(args)


@register_model_architecture("qn_transformer", "qn_transformer_iwslt")
def qn_transformer_iwslt(args):
    """IWSLT-sized: 6+6 layers, 512 wide, 1024 FFN, 4 heads."""
    transformer_iwslt_de_en(args)


@register_model_architecture("qn_transformer", "qn_transformer_small")
def qn_transformer_small(args):
    """A CPU-sized translation model for the demo and tests: 3+3 layers, 256 wide."""
    for side in ("encoder", "decoder"):
        set_defaults(args, **{f"{side}_layers": 3, f"{side}_embed_dim": 256, f"{side}_ffn_embed_dim": 1024, f"{side}_attention_heads": 4})
    base_architecture(args)
