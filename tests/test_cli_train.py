"""Quant-Noise training through the real fairseq CLIs on the tiny KJV slice."""
import pytest

from conftest import PLUGIN, TINY_LM, eval_lm_ppl, last_valid_ppl, run, train_lm

TRANSFORMER_LM_DIMS = [*TINY_LM, "--decoder-input-dim", "64", "--decoder-output-dim", "64"]


@pytest.mark.parametrize(
    "arch_args, criterion",
    [
        (["--arch", "qn_transformer_lm", *TINY_LM], "cross_entropy"),
        (["--arch", "qn_transformer_lm", *TINY_LM], "qn_cross_entropy"),
        (["--arch", "transformer_lm", *TRANSFORMER_LM_DIMS], "qn_cross_entropy"),
        (["--arch", "lstm_lm", "--decoder-embed-dim", "64", "--decoder-hidden-size", "64", "--decoder-out-embed-dim", "64"], "qn_cross_entropy"),
    ],
    ids=["qn_arch", "qn_arch+qn_criterion", "transformer_lm+qn_criterion", "lstm_lm+qn_criterion"],
)
def test_noise_training_then_eval_lm(lm_data, tmp_path, arch_args, criterion):
    noise = ["--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "8", "--quant-noise-scalar", "0.2", "--quant-noise-scalar-bits", "4"]
    result = train_lm(lm_data, tmp_path, *arch_args, "--criterion", criterion, *noise, max_update=4)
    assert "quant-noise: pq=0.1 (block 8), scalar=0.2 (int4)" in result.output  # applied, exactly once:
    assert result.output.count("quant-noise: pq=") == 1
    ppl = eval_lm_ppl(lm_data, tmp_path / "checkpoint_last.pt", "--user-dir", PLUGIN)
    assert ppl == pytest.approx(last_valid_ppl(result.output), rel=5e-3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quant-noise-pq", "1.0"], "--quant-noise-pq=1.0: must be in [0, 1)"),
        (["--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "5"], "does not divide the input dimension of layer decoder.embed_tokens"),
        (["--quant-noise-scalar", "0.1", "--quant-noise-scalar-bits", "5"], "--quant-noise-scalar-bits=5"),
    ],
)
def test_bad_noise_flags_fail_before_training(lm_data, tmp_path, flags, message):
    result = train_lm(lm_data, tmp_path, "--arch", "qn_transformer_lm", *TINY_LM, *flags, max_update=2, check=False)
    assert result.returncode != 0
    assert message in result.output
    assert "num_updates" not in result.output


def test_hydra_entry_point_with_shipped_config(lm_data, tmp_path):
    result = run([
        "fairseq-hydra-train", "--config-dir", "configs/hydra", "--config-name", "kjv_lm_quant_noise",
        f"task.data={lm_data}", f"common.user_dir={PLUGIN}", f"checkpoint.save_dir={tmp_path}",
        "optimization.max_update=3", "model.decoder_layers=1", "model.decoder_embed_dim=64", "model.decoder_ffn_embed_dim=128",
        "task.tokens_per_sample=64", "dataset.max_tokens=512", "common.log_interval=1", f"hydra.run.dir={tmp_path}/hydra",
    ])
    assert "quant-noise: pq=0.1 (block 8)" in result.output
    assert (tmp_path / "checkpoint_last.pt").exists()


def test_quant_noise_finetuning_of_a_trained_checkpoint(lm_data, dense_lm, tmp_path):
    """The paper's post-processing use: an existing dense checkpoint, then a few updates with Quant-Noise."""
    result = train_lm(lm_data, tmp_path, "--arch", "qn_transformer_lm", *TINY_LM, "--finetune-from-model", dense_lm,
                      "--quant-noise-pq", "0.1", "--quant-noise-pq-embeddings", "0.05", max_update=4)
    assert f"Loaded checkpoint {dense_lm} (epoch" in result.output
    assert "quant-noise: pq=0.1 (block 8), scalar=0.0 (int8) on 14 layers; embeddings pq=0.05" in result.output
    first_loss = float(result.output.split("train_inner")[1].split("loss=")[1].split(",")[0])
    assert first_loss < 10.5  # from the dense model's weights (a fresh model starts at ~11.6 bits on 3,112 types)
    ppl = eval_lm_ppl(lm_data, tmp_path / "checkpoint_last.pt", "--user-dir", PLUGIN)
    assert ppl == pytest.approx(last_valid_ppl(result.output), rel=5e-3)
