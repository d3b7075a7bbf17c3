"""What every plugin architecture does when fairseq builds it: its defaults, then the plugin's noise."""
from ..fairseq_options import disable_fairseq_builtin_noise, noise_config_of
from ..quant_noise import apply_quant_noise_


def set_defaults(args, **values) -> None:
    """Architecture presets: each value unless the command line gave one (fairseq's getattr idiom)."""
    for name, value in values.items():
        setattr(args, name, getattr(args, name, value))


class QuantNoiseModelMixin:
    """``build_model``: the architecture's defaults, fairseq's own noise switched off (it would add a
    Linear, write weights in place, and quantize on CUDA only), the plugin's noise attached once."""

    @staticmethod
    def architecture_defaults(args) -> None:
        raise NotImplementedError

    @classmethod
    def build_model(cls, args, task):
        cls.architecture_defaults(args)
        noise = noise_config_of(args)  # validates before anything is built
        disable_fairseq_builtin_noise(args)
        model = super().build_model(args, task)
        model.quant_noise_config = noise
        apply_quant_noise_(model, noise)
        return model
