"""How compressed layers compute at inference: the weight decoded once (and rebuilt when it changes),
int8 on CPUs without VNNI (7-bit activations, against their reference), the per-layer choice of int8
or float, and the one line that says what runs."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant_noise_plugin import inference, int8_linear
from quant_noise_plugin.activations import ActivationQuantizer, affine_qparams, fake_quantize_activation
from quant_noise_plugin.compressed import attach_activation_quantizer, attach_provider, free_dense_weight
from quant_noise_plugin.decoded import LOW_MEMORY_SWITCH, decoded, is_cached
from quant_noise_plugin.int8_linear import AVX2_WITHOUT_VNNI, Int8LinearWeight, choose_compute, reduced_range
from quant_noise_plugin.pq import PQCodebook
from quant_noise_plugin.providers import PQ_CHILD, SCALAR_CHILD
from quant_noise_plugin.scalar import ScalarCodes, quantize



def pq_linear(seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(32, 16)
    codebook = PQCodebook(layer.weight.shape, 4, 8)
    codebook.fit(layer.weight, n_iter=3)
    attach_provider(layer, PQ_CHILD, codebook)
    return layer, codebook


def test_eval_decodes_once_and_a_centroid_step_rebuilds():
    layer, codebook = pq_linear()
    x = torch.randn(5, 32)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        cached = decoded(codebook)
        assert is_cached(codebook) and decoded(codebook) is cached  # the same tensor, not rebuilt
        assert torch.equal(layer(x), first)
    layer.train()  # a centroid step: training forward, backward, optimizer
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).pow(2).sum().backward()
    assert codebook.centroids.grad is not None and not is_cached(codebook)  # training drops the copy
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
        assert not torch.allclose(after, first)
        assert torch.allclose(after, F.linear(x, codebook(), layer.bias))  # the new centroids, not the cached weight
        codebook.centroids.add_(1.0)  # any in-place change, e.g. loading a state dict
        assert torch.allclose(layer(x), F.linear(x, codebook(), layer.bias))


def test_low_memory_mode_and_autograd_rebuild_every_time(monkeypatch):
    layer, codebook = pq_linear()
    layer.eval()
    monkeypatch.setenv(LOW_MEMORY_SWITCH, "1")
    with torch.no_grad():
        layer(torch.randn(2, 32))
        assert not is_cached(codebook) and decoded(codebook) is not decoded(codebook)
    monkeypatch.delenv(LOW_MEMORY_SWITCH)
    layer(torch.randn(2, 32)).sum().backward()  # eval mode with autograd (e.g. saliency): a fresh weight with its graph
    assert not is_cached(codebook) and codebook.centroids.grad is not None


def test_the_decoded_weight_takes_the_dense_kernels():
    """matmul folds a non-contiguous 3-D input into one mm only for a weight that requires grad (as a Parameter)."""
    layer, codebook = pq_linear()
    layer.eval()
    x = torch.randn(16, 4, 32).transpose(0, 1)  # (batch, time, channels) seen through a transpose, as fairseq's output layer
    with torch.no_grad(), torch.profiler.profile() as profile:
        layer(x)
        layer(x)
    ops = {event.key for event in profile.key_averages()}
    assert "aten::bmm" not in ops


def test_reduced_range_keeps_the_calibrated_range_on_7_bits():
    scale, zero_point = affine_qparams(-1.0, 3.0)
    scale7, zero_point7 = reduced_range(scale, zero_point, 7)
    assert scale7 == pytest.approx(4.0 / 127, rel=1e-3) and zero_point7 == 32
    x = torch.linspace(-1, 3, 1001)
    codes = torch.round(x / scale7) + zero_point7
    assert int(codes.min()) == 0 and int(codes.max()) == 127
    error = (fake_quantize_activation(x, scale7, zero_point7, 7) - x).abs().max()
    assert float(error) <= scale7 / 2 + 1e-6


REDUCED_RANGE = """
import torch, torch.nn.functional as F
from quant_noise_plugin import int8_linear
from quant_noise_plugin.activations import affine_qparams, fake_quantize_activation
from quant_noise_plugin.int8_linear import Int8LinearWeight
from quant_noise_plugin.scalar import quantize
support = int8_linear.kernel_support()
print("bits", support.activation_bits, support.reason)
torch.manual_seed(0)
w = torch.randn(96, 64) * 0.1
codes, scale, zero_point = quantize(w, 8, per_channel=True, symmetric=True)
dense = (codes.float() - zero_point) * scale
x = torch.randn(3, 10, 64) * 2
x[0, 0, :] = 4.0  # full range on a whole row: the case that saturates 8-bit inputs without VNNI
in_scale, in_zero_point = affine_qparams(-4.0, 4.0)
weight = Int8LinearWeight.from_codes(codes, scale, zero_point, in_scale, in_zero_point, dequantize=lambda: dense, compute="int8")
bias = torch.randn(96)
kernel, reference = F.linear(x, weight, bias), weight.reference_linear(x, bias)
eight_bit = F.linear(fake_quantize_activation(x, in_scale, in_zero_point), dense, bias)
print("input bits", weight.input_bits)
print("kernel vs 7-bit reference", float((kernel - reference).abs().max()))
print("7-bit vs 8-bit reference", float((reference - eight_bit).abs().max() / eight_bit.abs().max()))
"""


def test_without_vnni_the_kernel_takes_7_bit_inputs_and_matches_its_reference():
    out = subprocess.run([sys.executable, "-c", REDUCED_RANGE], capture_output=True, text=True,
                         env={**os.environ, **AVX2_WITHOUT_VNNI}, check=True).stdout
    values = dict(line.rsplit(" ", 1) for line in out.splitlines() if line.startswith(("input bits", "kernel vs", "7-bit vs")))
    assert out.startswith("bits 7 ") and "lacks VNNI" in out
    assert values["input bits"] == "7"
    assert float(values["kernel vs 7-bit reference"]) < 1e-4  # exact integer sums: float rounding only
    assert float(values["7-bit vs 8-bit reference"]) < 0.05  # a coarser step, the same range


def test_each_layer_computes_where_it_measured_faster(monkeypatch):
    monkeypatch.setattr(int8_linear, "int8_speedup", lambda out_features, in_features, bits: 2.0 if in_features >= 256 else 0.6)
    assert choose_compute(256, 256, True)[0] == "int8"
    compute, why = choose_compute(64, 64, True)
    assert compute == "float" and "x0.60" in why
    assert choose_compute(256, 256, False)[0] == "reference"  # no symmetric int8 codes
    monkeypatch.setenv(int8_linear.KERNEL_SWITCH, "1")
    assert choose_compute(64, 64, True)[0] == "int8"
    monkeypatch.setenv(int8_linear.KERNEL_SWITCH, "0")
    assert choose_compute(256, 256, True) == ("reference", "QUANT_NOISE_INT8_KERNELS=0")
    monkeypatch.setenv(int8_linear.KERNEL_SWITCH, "yes")
    with pytest.raises(ValueError, match="QUANT_NOISE_INT8_KERNELS='yes': use auto, 1 or 0"):
        choose_compute(256, 256, True)


def int8_model():
    """Two int8-weight Linears with int8 inputs, 256 and 64 wide."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 64))
    for name in ("0", "2", "3"):
        layer = model.get_submodule(name)
        attach_provider(layer, SCALAR_CHILD, ScalarCodes(layer.weight.shape, 8, symmetric=True).fit(layer.weight))
        attach_activation_quantizer(layer, ActivationQuantizer(*affine_qparams(-3.0, 3.0)))
    return model.eval()


def test_one_line_says_what_runs_and_why(monkeypatch, caplog):
    monkeypatch.setattr(int8_linear, "int8_speedup", lambda out_features, in_features, bits: 2.0 if in_features >= 256 else 0.6)
    with caplog.at_level(logging.INFO, logger="quant_noise_plugin"):
        layers = inference.prepare_inference(int8_model())
    lines = [r for r in caplog.records if r.name == "quant_noise_plugin.inference"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    support = int8_linear.kernel_support()  # what this CPU's kernel takes: the line says 7-bit inputs and why, or nothing
    bits = "" if support.activation_bits == 8 else f" with {support.activation_bits}-bit activations: {support.reason}"
    assert f"2 of 3 Linear layers on oneDNN int8 kernels{bits}; 1 in float compute (int8 measured slower" in lines[0].getMessage()
    assert [w.compute for w in layers.values()] == ["int8", "int8", "float"]

    caplog.clear()
    monkeypatch.setattr(int8_linear, "kernel_support", lambda: int8_linear.KernelSupport(None, "this torch build has no oneDNN"))
    with caplog.at_level(logging.INFO, logger="quant_noise_plugin"):
        model = int8_model()
        layers = inference.prepare_inference(model)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "quant_noise_plugin.inference"]
    assert line == ("int8 activations: no int8 kernel on this machine (this torch build has no oneDNN); "
                    "3 of 3 Linear layers compute in float with their decoded int8/PQ weights")
    x = torch.randn(4, 256)
    with torch.no_grad():  # float compute: the int8 weights on the float input, no fake quantization
        expected = model[3](model[2](model[1](F.linear(x, model[0].weight_int(), model[0].bias))))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_attention_whose_projections_all_compute_in_float_takes_the_fused_path_again(monkeypatch):
    """int8 inputs route fairseq's attention through its projections; where every projection measured faster in
    float, nothing acts on their inputs any more and the fused path (up to 10% faster on small models) comes back.
    An attention module unfused by its own configuration stays so."""
    from fairseq.modules import MultiheadAttention

    from quant_noise_plugin.compressed import route_int8_attention
    from quant_noise_plugin.weight_swap import materialize_attention_weights

    def model_with_int8_attention(own_setting=False):
        torch.manual_seed(0)
        model = nn.ModuleDict({"attn": MultiheadAttention(64, 4, self_attention=True)})
        model.attn.skip_embed_dim_check = own_setting
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layer = getattr(model.attn, name)
            attach_provider(layer, SCALAR_CHILD, ScalarCodes(layer.weight.shape, 8, symmetric=True).fit(layer.weight))
            free_dense_weight(layer)
            attach_activation_quantizer(layer, ActivationQuantizer(*affine_qparams(-3.0, 3.0)))
        route_int8_attention(model)
        materialize_attention_weights(model)  # as every load does: the fused path reads the projections' weights
        assert model.attn.skip_embed_dim_check
        return model.eval()

    x = torch.randn(5, 2, 64)
    monkeypatch.setattr(int8_linear, "int8_speedup", lambda *args: 2.0)
    model = model_with_int8_attention()
    inference.prepare_inference(model)
    assert model.attn.skip_embed_dim_check  # int8 kernels on the projections: their inputs must be reached
    monkeypatch.setattr(int8_linear, "int8_speedup", lambda *args: 0.5)
    model = model_with_int8_attention()
    with torch.no_grad():
        unfused = model.attn(x, x, x)[0]
    inference.prepare_inference(model)
    assert not model.attn.skip_embed_dim_check
    with torch.no_grad():
        assert torch.allclose(model.attn(x, x, x)[0], unfused, atol=1e-5)  # the same float computation, fused
    own = model_with_int8_attention(own_setting=True)
    inference.prepare_inference(own)
    assert own.attn.skip_embed_dim_check


def test_attention_builds_each_projection_weight_once_per_call_fused_or_incremental():
    """The attention-level hook puts the projections' weights in place for fairseq's fused kernel; when the call cannot
    take it (incremental decoding, as in generation), the projections run and compute their own: not twice."""
    from fairseq.modules import MultiheadAttention

    from quant_noise_plugin.weight_swap import add_weight_fn, materialize_attention_weights

    torch.manual_seed(0)
    attention = MultiheadAttention(16, 2, self_attention=True).eval()
    calls = {name: 0 for name in ("q_proj", "k_proj", "v_proj", "out_proj")}

    def counting(name):
        def fn(weight):
            calls[name] += 1
            return weight * 1.0  # a derived copy, as a provider's
        return fn

    for name in calls:
        add_weight_fn(getattr(attention, name), counting(name))
    materialize_attention_weights(attention)
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        fused = attention(query=x, key=x, value=x)[0]
        assert set(calls.values()) == {1}
        state, steps = {}, []
        for t in range(3):  # token by token, as fairseq's SequenceGenerator
            steps.append(attention(query=x[t:t + 1], key=x[t:t + 1], value=x[t:t + 1], incremental_state=state)[0])
    assert set(calls.values()) == {4}  # 1 fused call + 3 incremental ones
    assert torch.allclose(torch.cat(steps)[-1], fused[-1], atol=1e-5)  # the last step sees every token, as the full call's
