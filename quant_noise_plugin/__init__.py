"""quant-noise: Quant-Noise training and iterative Product Quantization for fairseq.

``--user-dir quant_noise_plugin`` imports this package, which registers the plugin's
architectures, criterions and tasks. The math (noise, scalar and PQ quantizers, k-means) lives in
plain-torch modules importable without fairseq.
"""
__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the math modules work without fairseq
    pass
else:
    from .errors import install_one_line_errors
    from .safe_load import allow_fairseq_checkpoint_classes

    allow_fairseq_checkpoint_classes()
    install_one_line_errors()
    from . import criterions, models, tasks  # noqa: F401  (registration)
