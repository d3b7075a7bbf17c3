"""``qn_roberta``: fairseq's RoBERTa encoder with the plugin's Quant-Noise, and CPU-sized presets.

Same modules, parameters and state-dict keys as ``roberta`` (its checkpoints load into it, and with
the noise off it is the same model). Two additions:
- classification heads registered after the model is built (``--task sentence_prediction`` does)
  get the same noise as the rest;
- checkpoints whose heads are compressed load: fairseq sizes a head from its ``dense.weight`` and
  ``out_proj.weight``, which a compressed head no longer has, so their shapes are given to it.
"""
import torch
from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaModel, base_architecture

from ..bitpack import bits_for
from ..compressed import PQ_CHILD, SCALAR_CHILD
from ..fairseq_options import EncoderSharingOptions, QuantNoiseOptions, add_missing_args, set_missing_noise_defaults
from ..quant_noise import apply_quant_noise_
from .compressed_loading import CompressedLoadingMixin
from .noised_model import QuantNoiseModelMixin, set_defaults

HEADS = "classification_heads."


@register_model("qn_roberta")
class QNRobertaModel(QuantNoiseModelMixin, CompressedLoadingMixin, RobertaModel):
    @staticmethod
    def architecture_defaults(args):
        qn_roberta_architecture(args)

    @classmethod
    def add_args(cls, parser):
        RobertaModel.add_args(parser)
        add_missing_args(parser, QuantNoiseOptions())
        add_missing_args(parser, EncoderSharingOptions())

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        noise = getattr(self, "quant_noise_config", None)
        if noise is not None and noise.enabled:
            apply_quant_noise_(self, noise, within=f"{HEADS}{name}")

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if getattr(self.args, "load_checkpoint_heads", False):  # the hub: heads come from the checkpoint
            for name, (num_classes, inner_dim) in head_shapes(state_dict, self.args.encoder_embed_dim).items():
                if name not in self.classification_heads:
                    self.register_classification_head(name, num_classes, inner_dim)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def upgrade_state_dict_named(self, state_dict, name):
        """Give fairseq's head logic the dense shapes it reads, then take the stand-ins away."""
        prefix = name + "." if name != "" else ""
        stand_ins = []
        for head, (num_classes, inner_dim) in head_shapes(state_dict, self.args.encoder_embed_dim, prefix).items():
            for layer, rows in (("dense", inner_dim), ("out_proj", num_classes)):
                key = f"{prefix}{HEADS}{head}.{layer}.weight"
                if key not in state_dict:
                    state_dict[key] = torch.empty(rows, 0)
                    stand_ins.append(key)
        super().upgrade_state_dict_named(state_dict, name)
        for key in stand_ins:
            state_dict.pop(key, None)


def _stored_rows(state_dict, layer_prefix: str, in_features: int):
    """Output rows of a head layer from whichever form the checkpoint stores it in."""
    weight = state_dict.get(layer_prefix + "weight")
    if weight is not None:
        return weight.shape[0]
    scalar = f"{layer_prefix}{SCALAR_CHILD}."
    codes = state_dict.get(scalar + "codes")
    if codes is not None:
        return codes.shape[0]
    if scalar + "codes_packed" in state_dict:  # int4 and below: rows * in_features codes of n_bits, bit-packed
        # the last byte's padding is less than one row, which the floor drops
        return state_dict[scalar + "codes_packed"].numel() * 8 // int(state_dict[scalar + "n_bits"]) // in_features
    pq = f"{layer_prefix}{PQ_CHILD}."
    centroids = state_dict.get(pq + "centroids", state_dict.get(pq + "centroids_codes"))
    if centroids is None:
        return None
    n_centroids, block_size = centroids.shape
    codes = state_dict.get(pq + "codes")
    # bit-packed codes: the last byte's padding is less than one block, which the floor below drops
    n_blocks = codes.numel() if codes is not None else state_dict[pq + "codes_packed"].numel() * 8 // bits_for(n_centroids)
    return n_blocks * block_size // in_features


def head_shapes(state_dict, input_dim: int, prefix: str = ""):
    """{head name: (num_classes, inner_dim)} of the classification heads a checkpoint holds."""
    names = sorted({k[len(prefix + HEADS):].split(".")[0] for k in state_dict if k.startswith(prefix + HEADS)})
    shapes = {}
    for head in names:
        base = f"{prefix}{HEADS}{head}."
        inner_dim = _stored_rows(state_dict, base + "dense.", input_dim)
        num_classes = _stored_rows(state_dict, base + "out_proj.", inner_dim or input_dim)
        if inner_dim and num_classes:
            shapes[head] = (num_classes, inner_dim)
    return shapes


@register_model_architecture("qn_roberta", "qn_roberta")
def qn_roberta_architecture(args):
    base_architecture(args)
    set_missing_noise_defaults(args)


@register_model_architecture("qn_roberta", "qn_roberta_base")
def qn_roberta_base(args):
    qn_roberta_architecture(args)


@register_model_architecture("qn_roberta", "qn_roberta_small")
def qn_roberta_small(args):
    """A CPU-sized encoder for the KJV tasks: 4 layers, 256 wide, 1024 FFN, 4 heads (tied LM head)."""
    set_defaults(args, encoder_layers=4, encoder_embed_dim=256, encoder_ffn_embed_dim=1024, encoder_attention_heads=4)
    qn_roberta_architecture(args)


@register_model_architecture("qn_roberta", "qn_roberta_tiny")
def qn_roberta_tiny(args):
    """For tests: 2 layers, 64 wide."""
    set_defaults(args, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=2)
    qn_roberta_architecture(args)
