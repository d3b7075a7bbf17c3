"""Importing the user dir registers every model, criterion and task; the console command works."""
import pytest

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
    for rel in ("lm/bin/train.bin", "lm/bin/dict.txt", "mt/spm/train.es", "mt/bin/train.en-es.es.bin", "mt/bin/dict.en.txt", "mt/raw/test.es",
                "cls/raw/test.input1", "cls/bin/input0/train.bin", "cls/bin/label/valid.bin", "cls/bin/label/dict.txt"):
        assert (fresh / rel).read_bytes() == (tiny_data / rel).read_bytes(), rel


def test_checkpoint_names_map_presets_to_their_stock_and_plugin_twins():
    import argparse

    from quant_noise_plugin.checkpoints import CheckpointError, use_plugin_names, use_stock_names

    cfg = {"model": argparse.Namespace(_name="qn_transformer_lm_small", arch="qn_transformer_lm_small", decoder_layers=4,
                                       quant_noise_exclude=None),
           "task": {"_name": "ipq_language_modeling", "ipq_config": "s.yaml", "max_update": 6, "data": "d"},
           "criterion": {"_name": "qn_cross_entropy", "qn_pq": 0.1, "sentence_avg": False}}
    use_stock_names(cfg)
    assert cfg["model"] == {"_name": "transformer_lm", "decoder_layers": 4}  # a plain dict: stock torch.load reads it
    assert cfg["task"] == {"_name": "language_modeling", "data": "d"}
    assert cfg["criterion"] == {"_name": "cross_entropy", "sentence_avg": False}
    plugin = {"model": {"_name": "transformer_iwslt_de_en"}}
    use_plugin_names(plugin)
    assert plugin["model"]["_name"] == "qn_transformer"
    with pytest.raises(CheckpointError, match="'lstm_lm' has no plugin twin"):
        use_plugin_names({"model": {"_name": "lstm_lm"}})


def test_the_command_explains_itself_in_workflow_order():
    import argparse

    from quant_noise_plugin.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    order = ["data", "prune", "schedule", "plan", "pack", "size", "inspect", "unpack"]
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(subparsers.choices) == order and "docs/usage.md" in text
    assert [text.index(f"\n    {name} ") for name in order] == sorted(text.index(f"\n    {name} ") for name in order)
    for name, sub in subparsers.choices.items():  # every positional and --data says what it is
        for action in sub._actions:
            if not action.option_strings or "--data" in action.option_strings:
                assert action.help, f"quant-noise {name} {action.dest}: no help"
    plan = subparsers.choices["plan"]
    assert "{weights,activations,output}" in plan.format_help()
    for argv in (["plan", "x.pt", "--calibrate", "d", "-o", "p.yaml"],
                 ["plan", "x.pt", "--target-size", "1KB", "--target-ratio", "4", "--calibrate", "d", "-o", "p.yaml"]):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{argv}: accepted")
