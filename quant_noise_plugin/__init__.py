"""quant-noise: Quant-Noise training and iterative Product Quantization for fairseq.

``--user-dir quant_noise_plugin`` imports this package, which registers the plugin's
architectures, criterions and tasks. The math (noise, scalar and PQ quantizers, k-means) lives in
plain-torch modules importable without fairseq.
"""
__version__ = "0.1.0"

import logging
import os
import sys

if os.path.basename(sys.argv[0]) == "quant-noise" and "--verbose" not in sys.argv:
    # the `quant-noise` command's output is its own: fairseq logs an import-time notice at INFO
    # (text_to_speech's "Please install tensorboardX") through a basicConfig of its own
    logging.getLogger("fairseq").setLevel(logging.WARNING)

try:
    import fairseq  # noqa: F401
except ImportError:  # the math modules work without fairseq
    pass
else:
    from .checkpoint_guard import install_checkpoint_guard
    from .errors import install_one_line_errors
    from .safe_load import allow_fairseq_checkpoint_classes
    from .torchrun_cpu import allow_torchrun_without_gpus

    allow_fairseq_checkpoint_classes()
    install_one_line_errors()
    install_checkpoint_guard()
    allow_torchrun_without_gpus()
    import warnings

    # fairseq's data iterator always asks for pinned memory; on a machine without a GPU torch warns on every
    # batch (the hub's score() included): nothing is wrong and nothing can be done, so the warning is dropped
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    from . import criterions, models, tasks  # noqa: F401  (registration)
