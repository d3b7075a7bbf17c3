"""Importing the user dir registers every model, criterion and task; the console command works."""
import quant_noise_plugin  # noqa: F401
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.tasks import TASK_REGISTRY

from conftest import run


def test_user_dir_registers_everything():
    for arch in ("qn_transformer_lm", "qn_transformer_lm_wiki103", "qn_transformer_lm_small", "qn_transformer", "qn_transformer_iwslt", "qn_transformer_small"):
        assert arch in ARCH_MODEL_REGISTRY, arch
    assert {"qn_cross_entropy", "qn_label_smoothed_cross_entropy"} <= set(CRITERION_REGISTRY)
    assert {"ipq_language_modeling", "ipq_translation"} <= set(TASK_REGISTRY)


def test_console_command_help():
    out = run(["quant-noise", "--help"]).output
    for sub in ("size", "schedule", "pack", "unpack", "data"):
        assert sub in out


def test_data_refuses_a_stale_output_directory(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "half-written.txt").write_text("x")
    result = run(["quant-noise", "data", "--output", tmp_path], check=False)
    assert result.returncode == 2
    assert f"{tmp_path} exists but is not a complete data directory of this recipe: remove it or pass --force" in result.output
    assert (tmp_path / "lm" / "half-written.txt").exists()


def test_data_is_deterministic_and_reused(tiny_data, tmp_path):
    again = run(["quant-noise", "data", "--tiny", "--output", tiny_data]).output
    assert "is complete" in again and "reusing it" in again
    fresh = tmp_path / "again"
    run(["quant-noise", "data", "--tiny", "--output", fresh])
    # (the sentencepiece model file itself records its training paths, so compare what it produced)
    for rel in ("lm/bin/train.bin", "lm/bin/dict.txt", "mt/spm/train.es", "mt/bin/train.en-es.es.bin", "mt/bin/dict.en.txt", "mt/raw/test.es"):
        assert (fresh / rel).read_bytes() == (tiny_data / rel).read_bytes(), rel
