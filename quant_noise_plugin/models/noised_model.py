"""What every plugin architecture does when fairseq builds it: its defaults, its layers shared by chunks, then the
plugin's noise."""
import logging

from ..errors import QuantNoiseError
from ..fairseq_options import disable_fairseq_builtin_noise, noise_config_of
from ..quant_noise import apply_quant_noise_
from ..sharing import STACK_SIDES, check_shared_keys_agree, chunk_field, chunk_flag, share_stacks_

logger = logging.getLogger(__name__)


def set_defaults(args, **values) -> None:
    """Architecture presets: each value unless the command line gave one (fairseq's getattr idiom)."""
    for name, value in values.items():
        setattr(args, name, getattr(args, name, value))


class QuantNoiseModelMixin:
    """``build_model``: the architecture's defaults, fairseq's own noise switched off (it would add a
    Linear, write weights in place, and quantize on CUDA only), layers shared by chunks
    (``--decoder-share-layer-chunk``), the plugin's noise attached once (to each shared layer once)."""

    @staticmethod
    def architecture_defaults(args) -> None:
        raise NotImplementedError

    @classmethod
    def build_model(cls, args, task):
        cls.architecture_defaults(args)
        noise = noise_config_of(args)  # validates before anything is built
        disable_fairseq_builtin_noise(args)
        model = super().build_model(args, task)
        chunks = {side: getattr(args, chunk_field(side), None) for side in STACK_SIDES}
        shared = share_stacks_(model, chunks)
        if shared:
            logger.info("quant-noise: layers shared by chunks: %s", ", ".join(
                f"{name} by {chunks[name.split('.')[0]]} ({len(model.get_submodule(name)) - reused} weight sets)"
                for name, reused in shared.items()))
        model.quant_noise_config = noise
        apply_quant_noise_(model, noise)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        disagreeing = check_shared_keys_agree(self, state_dict)
        if disagreeing is not None:
            side = disagreeing.split(".")[0]
            raise QuantNoiseError(f"checkpoint key {disagreeing} differs from the layer it shares weights with: a checkpoint "
                                  f"of a model trained without {chunk_flag(side)} (or another chunk) cannot load into this one")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
