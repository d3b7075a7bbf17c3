"""int8 activations: observers, the int8 kernel path against the fake-quant reference, calibration
through `quant-noise pack`, evaluation on the packed file, and bad input."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PLUGIN, eval_lm_ppl, run
from quant_noise_plugin.activations import ActivationStats, affine_qparams, fake_quantize_activation
from quant_noise_plugin.int8_linear import AVX2_WITHOUT_VNNI, Int8LinearWeight, activation_bits_here, int8_kernels_enabled, reduced_range
from quant_noise_plugin.noise import activation_noise
from quant_noise_plugin.quant_noise import QuantNoiseConfig, apply_quant_noise_
from quant_noise_plugin.scalar import quantize

KERNELS = int8_kernels_enabled()  # oneDNN int8 in this torch, exact on this CPU (without them: the reference path, same numbers)
BITS = activation_bits_here(True)  # what symmetric int8 layers' inputs are quantized to here: 8, or 7 on a CPU without VNNI


def observed(values):
    stats = ActivationStats()
    stats.observe_range(values)
    stats.observe_histogram(values)
    return stats


def test_affine_parameters_cover_the_range_with_zero_exact():
    assert affine_qparams(-1.0, 3.0) == pytest.approx((4.0 / 255, 64))
    assert affine_qparams(0.5, 2.55) == pytest.approx((0.01, 0))  # all positive: 0 stays representable
    scale, zero_point = affine_qparams(-2.0, 2.0)
    x = torch.linspace(-2, 2, 1001)
    error = (fake_quantize_activation(x, scale, zero_point) - x).abs()
    assert float(error.max()) <= scale / 2 + 1e-6
    assert float(fake_quantize_activation(torch.zeros(1), scale, zero_point)) == 0.0


def test_observers_on_known_inputs():
    uniform = torch.linspace(-1, 3, 100_001)
    stats = observed(uniform)
    assert stats.range("minmax") == pytest.approx((-1.0, 3.0))
    lo, hi = stats.range("percentile")  # 0.01% of 4.0 from each end
    assert lo == pytest.approx(-1 + 4e-4, abs=3e-3) and hi == pytest.approx(3 - 4e-4, abs=3e-3)
    assert stats.range("mse") == pytest.approx((-1.0, 3.0), abs=0.1)  # nothing to gain by clipping a uniform

    torch.manual_seed(0)
    outlier = torch.randn(200_000)
    outlier[0] = 60.0
    stats = observed(outlier)
    assert stats.range("minmax")[1] == 60.0
    errors = {}
    for observer in ("minmax", "percentile", "mse"):
        scale, zero_point = stats.qparams(observer)
        errors[observer] = float(((fake_quantize_activation(outlier, scale, zero_point) - outlier) ** 2).mean())
    assert errors["mse"] <= min(errors["minmax"], errors["percentile"]) * 1.01
    relu = observed(torch.relu(torch.randn(50_000)))
    assert relu.qparams("minmax")[1] == 0  # a ReLU output uses all 256 levels above 0


def _int8_weight(out_features=96, in_features=64, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * 0.1
    codes, scale, zero_point = quantize(w, 8, per_channel=True, symmetric=True)
    return codes, scale, zero_point, (codes.float() - zero_point) * scale


def test_int8_kernel_matches_the_fake_quant_reference():
    codes, scale, zero_point, dense = _int8_weight()
    x = torch.randn(3, 10, 64) * 2
    in_scale, in_zero_point = affine_qparams(float(x.min()), float(x.max()))
    for compute in ("int8" if KERNELS else "reference", "reference"):  # the kernel and, on the same machine, its reference
        weight = Int8LinearWeight.from_codes(codes, scale, zero_point, in_scale, in_zero_point, dequantize=lambda: dense,
                                             compute=compute)
        assert weight.input_bits == BITS, compute  # the kernel's exact width on this CPU, for the reference too
    weight = Int8LinearWeight.from_codes(codes, scale, zero_point, in_scale, in_zero_point, dequantize=lambda: dense,
                                         compute="int8" if KERNELS else "reference")
    assert weight.uses_kernel == KERNELS
    bias = torch.randn(96)
    kernel = F.linear(x, weight, bias)

    def fake_quantized_linear(bits):
        params = (in_scale, in_zero_point) if bits == 8 else reduced_range(in_scale, in_zero_point, bits)
        return F.linear(fake_quantize_activation(x, *params, bits), dense, bias)

    reference, other_width = fake_quantized_linear(BITS), fake_quantized_linear(7 if BITS == 8 else 8)
    assert kernel.shape == (3, 10, 96)
    assert torch.allclose(kernel, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kernel, other_width, atol=1e-5, rtol=1e-5)  # the tolerance tells 7-bit inputs from 8-bit ones
    assert torch.allclose(weight.reference_linear(x, bias), reference, atol=1e-6)
    layer = nn.Linear(64, 96)
    layer.__dict__["weight"] = weight  # what weight_swap does
    assert torch.allclose(layer(x), F.linear(x, weight, layer.bias))
    assert torch.equal(weight * 1, dense) and weight.t().shape == (64, 96)  # any other use: the dequantized weight


def test_affine_weights_fall_back_to_the_reference_path():
    w = torch.randn(8, 16)
    codes, scale, zero_point = quantize(w, 8, per_channel=True)  # affine: not what oneDNN takes
    with pytest.raises(ValueError, match="symmetric"):
        Int8LinearWeight.from_codes(codes, scale, zero_point, 0.01, 128, dequantize=lambda: w)
    reference = Int8LinearWeight.reference_only((8, 16), 0.01, 128, dequantize=lambda: w)
    x = torch.randn(4, 16)
    assert not reference.uses_kernel
    assert torch.allclose(F.linear(x, reference), F.linear(fake_quantize_activation(x, 0.01, 128), w))


def test_activation_noise_quantizes_a_fraction_p_straight_through():
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    scale, zero_point = affine_qparams(-4.0, 4.0)
    out = activation_noise(x, 0.3, scale, zero_point)
    quantized = fake_quantize_activation(x.detach(), scale, zero_point)
    changed = out.detach() != x.detach()
    assert abs(changed.float().mean().item() - 0.3) < 0.03
    assert torch.allclose(out.detach()[changed], quantized[changed])
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_activation_noise_reaches_every_noised_linear_input_in_training_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    apply_quant_noise_(model, QuantNoiseConfig(activations=1.0, exclude="^3$"))
    inputs = {}
    for name in ("1", "3"):
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
    tokens = torch.randint(0, 40, (16, 32))
    model.train()
    model(tokens)
    first = inputs["1"]
    levels = torch.unique(first).numel()
    assert levels <= 256  # int8: at most 256 values in the whole input
    assert torch.unique(inputs["3"]).numel() > 256  # excluded layer: float input
    model.eval()
    model(tokens)
    assert torch.unique(inputs["1"]).numel() > 256


# --- through the CLIs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w8a8(ipq, lm_data, tmp_path_factory):
    """The tiny iPQ model packed with int8 centroids and rest, and int8 activations calibrated on the LM data."""
    out = tmp_path_factory.mktemp("w8a8") / "w8a8.pt"
    result = run(["quant-noise", "pack", ipq[0] / "checkpoint_last.pt", out, "--scalar-bits", "8", "--activation-bits", "8",
                  "--calibrate", lm_data, "--calibration-batches", "8"])
    return out, result.output


def test_pack_with_activations_then_eval_lm_kernel_equals_reference(w8a8, ipq, lm_data, tmp_path):
    path, output = w8a8
    assert "int8 inputs for 13 Linear layers, mse observer over 8 batches" in output
    state = torch.load(path, weights_only=True)
    assert state["quant_noise"]["activation_bits"] == 8
    model = state["model"]
    assert model["decoder.layers.0.fc1.input_quant.scale"].dtype == torch.float32  # not rounded to fp16
    assert "decoder.output_projection.input_quant.zero_point" in model
    assert int(model["decoder.layers.0.fc2.input_quant.zero_point"]) == 0  # after a ReLU
    assert model["decoder.layers.0.fc1.weight_pq.centroids_zero_point"].item() == 128  # symmetric int8 centroids
    kernel = eval_lm_ppl(lm_data, path, "--user-dir", PLUGIN)
    reference = run(["fairseq-eval-lm", lm_data, "--path", path, "--cpu", "--max-tokens", "1024", "--tokens-per-sample", "64",
                     "--gen-subset", "valid", "--user-dir", PLUGIN], env={**os.environ, "QUANT_NOISE_INT8_KERNELS": "0"}).output
    reference = float([line for line in reference.splitlines() if "Perplexity:" in line][-1].rsplit("Perplexity:", 1)[1])
    assert kernel == pytest.approx(reference, rel=1e-3)
    weights_only = tmp_path / "int8.pt"
    run(["quant-noise", "pack", ipq[0] / "checkpoint_last.pt", weights_only, "--scalar-bits", "8"])
    assert kernel == pytest.approx(eval_lm_ppl(lm_data, weights_only, "--user-dir", PLUGIN), rel=0.02)  # int8 inputs cost little

    size = run(["quant-noise", "size", path, "--json"]).output
    report = json.loads(size[size.index("{"):])
    assert len(report["activations"]) == 13 and all(a["bits"] == 8 and a["scale"] > 0 for a in report["activations"])
    assert abs(report["file_bytes"] - report["predicted_packed_file_bytes"]) <= 64
    assert "int8 inputs of 13 Linear layers" in run(["quant-noise", "size", path]).output

    dense = tmp_path / "dense.pt"
    run(["quant-noise", "unpack", path, dense])  # stock fairseq: float compute, scales dropped
    assert not any(".input_quant." in k for k in torch.load(dense, weights_only=True)["model"])
    # the unpacked file holds the w8a8 file's own weights (its symmetric int8 centroids and codes, decoded), to fp16 rounding
    from fairseq import checkpoint_utils

    from quant_noise_plugin.providers import provider_of

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(lm_data)})
    unpacked = torch.load(dense, weights_only=True)["model"]
    compared = 0
    for name, module in models[0].named_modules():
        provider = provider_of(module)
        if provider is not None and f"{name}.weight" in unpacked:
            ours = provider().detach().float()
            torch.testing.assert_close(unpacked[f"{name}.weight"].float(), ours, rtol=1e-3, atol=1e-3 * float(ours.abs().max()))
            compared += 1
    assert compared >= 13


LOGITS = """
import sys, torch
import quant_noise_plugin
from fairseq import checkpoint_utils
from quant_noise_plugin.int8_linear import Int8LinearWeight
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]], arg_overrides={"data": sys.argv[2]})
model = models[0].eval()
with torch.no_grad():
    logits = model(torch.arange(4, 36).reshape(2, 16))[0]
from quant_noise_plugin.inference import prepare_inference
print("kernel layers", sum(w.uses_kernel for w in prepare_inference(model, log=False).values()))
torch.save(logits, sys.argv[3])
"""


def test_every_linear_of_the_packed_model_runs_on_int8_kernels_with_reference_logits(w8a8, lm_data, tmp_path):
    import sys

    path, _ = w8a8
    every_layer = {**os.environ, "QUANT_NOISE_INT8_KERNELS": "1"}  # no speed test: the tiny model's layers may be faster in float
    out = run([sys.executable, "-c", LOGITS, path, lm_data, tmp_path / "kernel.pt"], env=every_layer).output
    assert f"kernel layers {13 if KERNELS else 0}" in out  # 8 attention projections, 4 FFN, the tied output projection (PQ, int8 centroids)
    run([sys.executable, "-c", LOGITS, path, lm_data, tmp_path / "reference.pt"], env={**os.environ, "QUANT_NOISE_INT8_KERNELS": "0"})
    kernel, reference = torch.load(tmp_path / "kernel.pt"), torch.load(tmp_path / "reference.pt")
    assert torch.allclose(kernel, reference, atol=1e-3, rtol=1e-4)  # inputs one bit apart differ by ~1e-2 (7 vs 8 bits)


@pytest.mark.parametrize("flags, message", [
    (["--scalar-bits", "8", "--activation-bits", "4", "--calibrate", "DATA"], "--activation-bits=4: activations are quantized to 8 bits only"),
    (["--activation-bits", "8", "--calibrate", "DATA"], "--activation-bits 8 needs int8 weights: add --scalar-bits 8"),
    (["--scalar-bits", "8", "--activation-bits", "8"], "--activation-bits 8 needs --calibrate DATA_DIR"),
    (["--scalar-bits", "8", "--calibrate", "DATA"], "--calibrate is for int8 activations"),
    (["--scalar-bits", "8", "--activation-bits", "8", "--calibrate", "OTHER"], "its source dictionary (3111 types) is not the model's (3112 types)"),
])
def test_bad_calibration_input_is_one_line_and_writes_nothing(ipq, lm_data, tmp_path, flags, message):
    other = tmp_path / "other"
    shutil.copytree(lm_data, other)
    lines = (other / "dict.txt").read_text().splitlines()
    (other / "dict.txt").write_text("\n".join(lines[:-1]) + "\n")  # another dictionary
    flags = [{"DATA": str(lm_data), "OTHER": str(other)}.get(f, f) for f in flags]
    out = tmp_path / "out.pt"
    result = run(["quant-noise", "pack", ipq[0] / "checkpoint_last.pt", out, *flags], check=False)
    assert result.returncode == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("out.pt*"))


def test_an_already_calibrated_file_is_refused(w8a8, lm_data, tmp_path):
    path, _ = w8a8
    result = run(["quant-noise", "pack", path, tmp_path / "again.pt", "--scalar-bits", "8", "--activation-bits", "8",
                  "--calibrate", lm_data], check=False)
    assert result.returncode == 2 and "already packed and calibrated (int8 activations)" in result.output
    assert not (tmp_path / "again.pt").exists()


def test_without_vnni_eval_lm_says_so_and_7_bit_inputs_keep_the_perplexity(w8a8, lm_data):
    path, _ = w8a8
    cmd = ["fairseq-eval-lm", lm_data, "--path", path, "--cpu", "--max-tokens", "1024", "--tokens-per-sample", "64",
           "--gen-subset", "valid", "--user-dir", PLUGIN]
    every_layer = {**os.environ, "QUANT_NOISE_INT8_KERNELS": "1"}

    def ppl(output):
        return float([line for line in output.splitlines() if "Perplexity:" in line][-1].rsplit("Perplexity:", 1)[1])

    native = run(cmd, env=every_layer).output
    avx2 = run(cmd, env={**every_layer, **AVX2_WITHOUT_VNNI}).output  # as on an AVX2-only CPU
    said = [line for line in avx2.splitlines() if "int8 activations:" in line]
    assert len(said) == 1 and "13 of 13 Linear layers on oneDNN int8 kernels with 7-bit activations: this CPU lacks VNNI" in said[0]
    assert ppl(avx2) == pytest.approx(ppl(native), rel=5e-3)


def test_inspect_names_what_computes_each_layer_here(w8a8):
    path, _ = w8a8
    out = run(["quant-noise", "inspect", path]).output
    assert "this machine: " in out and "int8 kernel: " in out
    rows = [line for line in out.splitlines() if line.startswith("decoder.")]
    assert len(rows) == 14  # the embedding (float input, the rows it looks up decoded from its codes) and 13 int8-input Linears
    assert sum(" int8 " in row for row in rows) == 13 and "rows from codes" in rows[0] and "only the rows looked up" in rows[0]
    assert all(("oneDNN int8" in row or " float " in row) and "measured x" in row for row in rows[1:])
    off = run(["quant-noise", "inspect", path, "--json"], env={**os.environ, "QUANT_NOISE_INT8_KERNELS": "0"}).output
    report = json.loads(off[off.index("{"):])
    assert {r["compute"] for r in report["layers"] if r["input"] == "int8"} == {"fake-quant reference"}
    assert report["machine"]["cpu_capability"] and report["machine"]["QUANT_NOISE_INT8_KERNELS"] == "0"
    assert report["machine"]["QUANT_NOISE_INFERENCE"] == "auto" and report["machine"]["model_tensor_bytes_at_load"] > 0
