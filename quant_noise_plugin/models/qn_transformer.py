"""``qn_transformer``: fairseq's encoder-decoder transformer with the plugin's Quant-Noise."""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer.transformer_legacy import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
)

from ..fairseq_options import QuantNoiseExtraOptions, add_missing_args, disable_fairseq_builtin_noise, noise_config_of
from ..quant_noise import apply_quant_noise_
from .compressed_loading import CompressedLoadingMixin


@register_model("qn_transformer")
class QNTransformerModel(CompressedLoadingMixin, TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_missing_args(parser, QuantNoiseExtraOptions())

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        noise = noise_config_of(args)
        disable_fairseq_builtin_noise(args)
        model = super().build_model(args, task)
        model.quant_noise_config = noise
        apply_quant_noise_(model, noise)
        return model


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
        setattr(args, f"{side}_layers", getattr(args, f"{side}_layers", 3))
        setattr(args, f"{side}_embed_dim", getattr(args, f"{side}_embed_dim", 256))
        setattr(args, f"{side}_ffn_embed_dim", getattr(args, f"{side}_ffn_embed_dim", 1024))
        setattr(args, f"{side}_attention_heads", getattr(args, f"{side}_attention_heads", 4))
    base_architecture(args)
