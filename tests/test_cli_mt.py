"""Translation: Quant-Noise training, iPQ and fairseq-generate on the compressed checkpoint."""
import pytest

from conftest import COMMON_TRAIN, PLUGIN, run

TINY_MT = [
    "--arch", "qn_transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "64",
    "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings",
]
MT_TRAIN = [a for a in COMMON_TRAIN if a not in ("--tokens-per-sample", "64")]

SCHEDULE = """
defaults:
  Linear: {block_size: 4, n_centroids: 16}
  Embedding: {block_size: 4, n_centroids: 16}
kmeans_iterations: 5
stages:
  - name: all
    layers: '(encoder|decoder)\\.(layers\\.\\d+\\.(fc[12]|(self_attn|encoder_attn)\\.(q|k|v|out)_proj)|embed_tokens)'
    updates: 2
"""


@pytest.fixture(scope="module")
def mt_dense(tiny_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("mt_dense")
    data = tiny_data / "mt" / "bin"
    result = run(["fairseq-train", data, "--user-dir", PLUGIN, "--task", "translation", *TINY_MT, *MT_TRAIN,
                  "--criterion", "qn_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                  "--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "4", "--max-update", "4", "--save-dir", save])
    assert "quant-noise: pq=0.1 (block 4)" in result.output
    return data, save / "checkpoint_last.pt"


def test_ipq_translation_then_generate_on_the_compressed_checkpoint(mt_dense, tmp_path):
    data, dense = mt_dense
    schedule = tmp_path / "mt.yaml"
    schedule.write_text(SCHEDULE)
    result = run(["fairseq-train", data, "--user-dir", PLUGIN, "--task", "ipq_translation", "--ipq-config", schedule,
                  "--finetune-from-model", dense, *TINY_MT, *MT_TRAIN, "--criterion", "label_smoothed_cross_entropy",
                  "--max-update", "2", "--save-dir", tmp_path / "ipq"])
    assert "ipq stage 0 (all) quantized at update 0" in result.output
    packed = tmp_path / "packed.pt"
    run(["quant-noise", "pack", tmp_path / "ipq" / "checkpoint_last.pt", packed, "--scalar-bits", "8"])
    for path in (tmp_path / "ipq" / "checkpoint_last.pt", packed):
        out = run(["fairseq-generate", data, "--user-dir", PLUGIN, "--path", path, "--cpu", "--beam", "2", "--max-tokens", "2000",
                   "--max-len-b", "20", "--bpe", "sentencepiece", "--sentencepiece-model", data.parent / "spm.bpe.model",
                   "--scoring", "sacrebleu", "--gen-subset", "valid"]).output
        assert "Generate valid with beam=2" in out and "BLEU" in out
        assert sum(1 for l in out.splitlines() if l.startswith("H-")) == 200


def test_qn_criterion_gives_noise_to_fairseqs_transformer(tiny_data, tmp_path):
    stock = ["--arch", "transformer", *TINY_MT[2:]]
    result = run(["fairseq-train", tiny_data / "mt" / "bin", "--user-dir", PLUGIN, "--task", "translation", *stock, *MT_TRAIN,
                  "--criterion", "qn_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--quant-noise-pq", "0.2",
                  "--quant-noise-pq-block-size", "8", "--max-update", "2", "--save-dir", tmp_path])
    assert result.output.count("quant-noise: pq=0.2 (block 8)") == 1


def test_plan_meets_its_budget_on_a_translation_model(mt_dense, tmp_path):
    import re

    data, dense = mt_dense
    plan = tmp_path / "plan.yaml"
    run(["quant-noise", "plan", dense, "--target-ratio", "5", "--calibrate", data, "--calibration-batches", "2", "--updates", "4", "-o", plan])
    text = plan.read_text()
    predicted, target = (int(g.replace(",", "")) for g in re.search(r"a packed file of ([\d,]+) bytes predicted for a target of ([\d,]+)", text).groups())
    assert 0.99 * target <= predicted <= target
    assert "encoder" in text and "decoder" in text  # both sides planned
