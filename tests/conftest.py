"""Shared fixtures: a tiny real-text slice (KJV / RV1909) made once per session, and CLI helpers."""
import os
import subprocess
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers (pytest.ini) on two cores: one thread each, for them and their CLIs
    os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("ATEN_CPU_CAPABILITY"):
    # torch.compile's kernel cache is not keyed by ATen's capability: a kernel built for this CPU's own vector width, served
    # to a run capped to another (make test's AVX2 pass), computes garbage. Each capability gets a cache of its own.
    import getpass
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(REPO / "quant_noise_plugin")
BIN = Path(sys.executable).parent


def run(cmd, check=True, **kwargs):
    """Run a CLI from the venv; on failure show its output."""
    exe = cmd[0]
    if (BIN / exe).exists():
        cmd = [str(BIN / exe), *cmd[1:]]
    result = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, **kwargs)
    result.output = result.stdout  # stdout and stderr together: fairseq logs to either
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.output[-8000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    run(["quant-noise", "data", "--tiny", "--output", out])
    return out


# A small LM: 2 layers, 64 wide, tied embeddings; trains a few updates in seconds on 2 cores.
TINY_LM = [
    "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
    "--decoder-attention-heads", "2", "--share-decoder-input-output-embed",
]
COMMON_TRAIN = [
    "--optimizer", "adam", "--lr", "0.002", "--tokens-per-sample", "64", "--max-tokens", "1024",
    "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1", "--cpu", "--num-workers", "0",
]


def train_lm(data, save_dir, *extra, max_update=8, check=True):
    return run(["fairseq-train", data, "--user-dir", PLUGIN, "--task", "language_modeling", *COMMON_TRAIN,
                "--max-update", str(max_update), "--save-dir", save_dir, *extra], check=check)


def eval_lm_ppl(data, path, *extra, subset="valid", **run_kwargs):
    result = run(["fairseq-eval-lm", data, "--path", path, "--cpu", "--max-tokens", "1024", "--tokens-per-sample", "64",
                  "--gen-subset", subset, *extra], **run_kwargs)
    line = [l for l in result.output.splitlines() if "Perplexity:" in l][-1]
    return float(line.rsplit("Perplexity:", 1)[1])


def last_valid_ppl(train_output: str) -> float:
    lines = [l for l in train_output.splitlines() if "valid on 'valid' subset" in l]
    return float(lines[-1].split("| ppl ")[1].split(" |")[0])


@pytest.fixture(scope="session")
def lm_data(tiny_data):
    return tiny_data / "lm" / "bin"


@pytest.fixture(scope="session")
def dense_lm(lm_data, tmp_path_factory):
    """A plainly trained qn_transformer_lm (noise off) to compress."""
    save = tmp_path_factory.mktemp("dense_lm")
    train_lm(lm_data, save, "--arch", "qn_transformer_lm", *TINY_LM, max_update=30)
    return save / "checkpoint_last.pt"


# iPQ on the tiny LM: two stages, 16 centroids of 4 weights; the second k-means weighted by calibration inputs
SCHEDULE = """
defaults:
  Linear: {block_size: 4, n_centroids: 16}
  Embedding: {block_size: 4, n_centroids: 16}
kmeans_iterations: 10
stages:
  - name: ffn
    layers: 'decoder\\.layers\\.\\d+\\.fc[12]'
    updates: 3
  - name: attention_and_embeddings
    layers: 'decoder\\.(layers\\.\\d+\\.self_attn\\.(q|k|v|out)_proj|embed_tokens)'
    updates: 3
    objective: activations
"""


def ipq_train(data, save, dense, schedule_path, *extra, max_update=6, check=True):
    return train_lm(data, save, "--task", "ipq_language_modeling", "--ipq-config", schedule_path, "--finetune-from-model", dense,
                    "--arch", "qn_transformer_lm", *TINY_LM, "--lr", "0.0005", *extra, max_update=max_update, check=check)


@pytest.fixture(scope="session")
def schedule_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("schedule") / "two_stages.yaml"
    path.write_text(SCHEDULE)
    return path


@pytest.fixture(scope="session")
def ipq(lm_data, dense_lm, schedule_file, tmp_path_factory):
    save = tmp_path_factory.mktemp("ipq")
    result = ipq_train(lm_data, save, dense_lm, schedule_file)
    return save, result.output
