"""quant-noise: Quant-Noise training and iterative Product Quantization as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="quant-noise",
    version="0.1.0",
    description="Quant-Noise + iPQ extreme model compression for fairseq (plugin via --user-dir)",
    packages=find_packages(include=["quant_noise_plugin", "quant_noise_plugin.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch==2.13.0",  # the CPU wheel on this machine; never let pip pick another build
        # fairseq 0.12.2 does not import on Python >= 3.11 (dataclass mutable defaults);
        # fairseq-fixed is fairseq's main branch packaged for 3.11+ (import name: fairseq).
        "fairseq==0.12.2; python_version < '3.11'",
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "hydra-core>=1.0.7,<1.4",
        "omegaconf>=2.0.5,<2.4",
        "faiss-cpu",
        "sacrebleu>=2.0",
        "sentencepiece",
        "numba>=0.59,<0.62",  # the lookup-table kernel of PQ layers computing from their codes (lut.py); 0.61.2 measured
        "numpy<2",  # fairseq-fixed still calls np.compat.long (token_block_dataset: the hub's score/sample), removed in NumPy 2.0
    ],
    # baselines: benchmarks/cls_baselines.py (the classifier table's bag-of-words baseline); fairseq-fixed
    # happens to pull scikit-learn in today, declared here so the baseline does not depend on that
    extras_require={"test": ["pytest", "pytest-xdist"], "plot": ["matplotlib"], "baselines": ["scikit-learn", "scipy"]},
    entry_points={"console_scripts": ["quant-noise=quant_noise_plugin.cli:main"]},
)
