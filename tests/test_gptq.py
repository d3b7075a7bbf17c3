"""Scalar codes by error feedback (gptq.py) and `quant-noise pack --scalar-method gptq`."""
import pytest
import torch

from conftest import PLUGIN, eval_lm_ppl, run
from quant_noise_plugin.gptq import output_error, quantize_with_error_feedback
from quant_noise_plugin.scalar import dequantize, quantize


def _correlated_inputs(cols=96, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    x = torch.randn(n, cols, generator=g) @ mix * 0.3 + torch.randn(n, cols, generator=g)
    return x.T @ x / n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_feedback_lowers_the_output_error_on_the_same_grid(bits):
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.1
    hessian = _correlated_inputs()
    rtn = quantize(weight, bits, per_channel=True)
    codes, scale, zero = quantize_with_error_feedback(weight, hessian, bits)
    assert torch.equal(scale, rtn[1]) and torch.equal(zero, rtn[2])  # the stored format does not change
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    ours, theirs = output_error(weight, dequantize(codes, scale, zero), hessian), output_error(weight, dequantize(*rtn), hessian)
    assert ours < 0.8 * theirs, (ours, theirs)  # ~40% lower on these inputs at every width


def test_uncorrelated_inputs_leave_nothing_to_feed_back():
    """With a diagonal H, an error in one column cannot be compensated by another: the codes are round-to-nearest's."""
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    hessian = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.5)
    codes, _, _ = quantize_with_error_feedback(weight, hessian, 3)
    assert torch.equal(codes, quantize(weight, 3, per_channel=True)[0])


def test_inputs_no_batch_reached_are_rounded_and_shapes_are_checked():
    weight = torch.randn(8, 16)
    hessian = _correlated_inputs(cols=16)
    hessian[3, :] = hessian[:, 3] = 0  # input 3 never active
    codes, scale, zero = quantize_with_error_feedback(weight, hessian, 4)
    assert torch.isfinite(dequantize(codes, scale, zero)).all()
    with pytest.raises(ValueError, match="input moments of shape"):
        quantize_with_error_feedback(weight, torch.eye(8), 4)


def test_pack_with_error_feedback_beats_round_to_nearest_at_int2(dense_lm, lm_data, tmp_path):
    rtn, gptq = tmp_path / "rtn.pt", tmp_path / "gptq.pt"
    run(["quant-noise", "pack", dense_lm, rtn, "--scalar-bits", "2"])
    out = run(["quant-noise", "pack", dense_lm, gptq, "--scalar-bits", "2", "--scalar-method", "gptq", "--calibrate", lm_data,
               "--calibration-batches", "8"]).output
    assert "by error feedback (gptq) over 8 batches" in out
    # same format: every stored tensor has the same name, dtype and shape; only the codes' values and the marker differ
    states = {p.stem: torch.load(p, weights_only=False) for p in (rtn, gptq)}
    layout = {k: {n: (t.dtype, tuple(t.shape)) for n, t in s["model"].items() if torch.is_tensor(t)} for k, s in states.items()}
    assert layout["gptq"] == layout["rtn"] and len(layout["rtn"]) > 10
    assert any(not torch.equal(t, states["gptq"]["model"][n]) for n, t in states["rtn"]["model"].items() if torch.is_tensor(t))
    marker = states["gptq"]["quant_noise"]
    assert marker["scalar_method"] == "gptq" and marker["calibration_batches"] == 8
    ppl = {p.stem: eval_lm_ppl(lm_data, p, "--user-dir", PLUGIN) for p in (rtn, gptq)}
    dense = eval_lm_ppl(lm_data, dense_lm, "--user-dir", PLUGIN)
    assert ppl["gptq"] - dense < 0.5 * (ppl["rtn"] - dense), (ppl, dense)  # fairseq's own loader reads it as any int2 file
    result = run(["quant-noise", "pack", dense_lm, tmp_path / "x.pt", "--scalar-bits", "2", "--scalar-method", "gptq"], check=False)
    assert result.returncode == 2 and "--scalar-method gptq needs --scalar-bits N and --calibrate DATA_DIR" in result.output
    assert not (tmp_path / "x.pt").exists()
