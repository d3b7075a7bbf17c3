"""Behaviours a user relies on without seeing them: the safe loader's allow-list, the int8 saturation
fallback, int4 files through fairseq-eval-lm, the shipped LM schedules on the presets' models."""
import argparse
import datetime
import sys

import pytest
import torch

from conftest import PLUGIN, REPO, eval_lm_ppl, run


def test_safe_load_allows_fairseq_namespaces_and_refuses_any_other_class(tmp_path):
    from quant_noise_plugin.checkpoints import CheckpointError, read_checkpoint

    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": {"model": argparse.Namespace(arch="transformer_lm")}}, good)
    assert read_checkpoint(good)["cfg"]["model"].arch == "transformer_lm"
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.ones(2)}, "cfg": {}, "when": datetime.date(2026, 1, 1)}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt: holds a datetime\.date object, which the safe loader \(weights_only=True\) refuses"):
        read_checkpoint(bad)


def test_a_saturating_cpu_gets_7_bit_activations_and_no_kernel_when_even_those_saturate(monkeypatch):
    """Without VNNI, uint8 x int8 pair sums may saturate in int16: the probe must see it and reduce the range."""
    from quant_noise_plugin import int8_linear

    real = int8_linear._onednn_linear
    int8_linear.kernel_support.cache_clear()
    try:
        assert int8_linear.kernel_support().activation_bits is not None, "this torch build has no working oneDNN int8 kernel"

        def saturating_above(limit):
            def kernel(q, scale, zero_point, packed, weight_scales, bias):  # what an int16 accumulator does past the limit
                out = real(q, scale, zero_point, packed, weight_scales, bias)
                return torch.clamp(out, max=0.5 * float(out.max())) if int(q.max()) > limit else out
            return kernel

        monkeypatch.setattr(int8_linear, "_onednn_linear", saturating_above(127))  # AVX2 without VNNI
        int8_linear.kernel_support.cache_clear()
        support = int8_linear.kernel_support()
        assert support.activation_bits == 7 and "lacks VNNI" in support.reason and int8_linear.int8_kernels_enabled()
        monkeypatch.setattr(int8_linear, "_onednn_linear", saturating_above(63))
        int8_linear.kernel_support.cache_clear()
        assert int8_linear.kernel_support().activation_bits is None and not int8_linear.int8_kernels_enabled()
    finally:
        int8_linear.kernel_support.cache_clear()


def test_int4_pack_reloads_in_fairseq_eval_lm(dense_lm, lm_data, tmp_path):
    int8, int4 = tmp_path / "int8.pt", tmp_path / "int4.pt"
    run(["quant-noise", "pack", dense_lm, int8, "--scalar-bits", "8"])
    run(["quant-noise", "pack", dense_lm, int4, "--scalar-bits", "4"])
    assert int4.stat().st_size < 0.75 * int8.stat().st_size
    dense = eval_lm_ppl(lm_data, dense_lm, "--user-dir", PLUGIN)
    four = eval_lm_ppl(lm_data, int4, "--user-dir", PLUGIN)
    assert four != dense and abs(four / dense - 1) < 0.1  # int4 is lossy, not broken


def test_int3_int2_and_per_tensor_int4_packs_are_their_size_and_reload(dense_lm, lm_data, tmp_path):
    """The scalar baselines below per-row int4: 3 and 2 bits per row, and one scale per weight (the paper's)."""
    import json

    files = {}
    for name, flags in {"int4": ["--scalar-bits", "4"], "int3": ["--scalar-bits", "3"], "int2": ["--scalar-bits", "2"],
                        "int4_tensor": ["--scalar-bits", "4", "--per-tensor"]}.items():
        files[name] = tmp_path / f"{name}.pt"
        run(["quant-noise", "pack", dense_lm, files[name], *flags])
        out = run(["quant-noise", "size", files[name], "--json"]).output
        report = json.loads(out[out.index("{"):])
        assert abs(report["file_bytes"] - report["predicted_packed_file_bytes"]) <= 64, name
        assert {layer["method"] for layer in report["layers"]} >= {name[:4]}
    size = {name: path.stat().st_size for name, path in files.items()}
    assert size["int2"] < size["int3"] < size["int4"] and size["int4_tensor"] < size["int4"]
    state = torch.load(files["int4_tensor"], weights_only=True)
    assert state["model"]["decoder.layers.0.fc1.weight_int.scale"].numel() == 1
    assert state["model"]["decoder.layers.0.fc1.weight_int.codes_packed"].numel() == 128 * 64 * 4 // 8  # 4 bits a weight
    dense = eval_lm_ppl(lm_data, dense_lm, "--user-dir", PLUGIN)
    ppl = {name: eval_lm_ppl(lm_data, path, "--user-dir", PLUGIN) for name, path in files.items()}
    assert dense < ppl["int4"] < ppl["int2"]  # fewer bits, more loss; every file loads in fairseq-eval-lm
    result = run(["quant-noise", "pack", dense_lm, tmp_path / "x.pt", "--per-tensor"], check=False)
    assert result.returncode == 2 and "--per-tensor is how --scalar-bits quantizes: add --scalar-bits N" in result.output
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_shipped_lm_schedules_match_the_presets_model(preset, tmp_path):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from quant_noise_plugin.schedule import load_schedule, plan_schedule

    sys.path.insert(0, str(REPO / "scripts"))
    from experiments.grid import load_grid

    lm = load_grid().presets[preset].lm
    data = tmp_path / "lm"
    data.mkdir()
    (data / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(3000)))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--user-dir", PLUGIN, "--task", "language_modeling", *lm.arch, "--cpu"])
    model = tasks.setup_task(convert_namespace_to_omegaconf(args).task).build_model(convert_namespace_to_omegaconf(args).model)
    for column, path in lm.schedules.items():
        plans = plan_schedule(load_schedule(REPO / path), model, path)
        names = {n for stage in plans for layer in stage.layers for n in layer.names}
        assert "decoder.embed_tokens" in names and "decoder.layers.3.fc2" in names, column
        assert "decoder.layers.0.self_attn.q_proj" in names, column
