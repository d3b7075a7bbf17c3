"""Codes by error feedback (gptq.py): scalar ones and `quant-noise pack --scalar-method gptq`; PQ ones (objective: output)."""
import pytest
import torch

from conftest import PLUGIN, eval_lm_ppl, run
from quant_noise_plugin.gptq import (assign_codes_with_error_feedback, fit_centroids_to_output, output_error, quantize_pq_to_output,
                                     quantize_with_error_feedback)
from quant_noise_plugin.kmeans import assign, kmeans
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



def _pq_layer(rows=48, cols=96, block=8, k=16):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * 0.1
    fitted = kmeans(weight.reshape(-1, block), k, seed=0, backend="torch")
    return weight, fitted.centroids, fitted.assignments


def test_pq_codes_by_error_feedback_lower_the_output_error_with_the_same_centroids():
    weight, centroids, _ = _pq_layer()
    hessian = _correlated_inputs()
    # the best a block can do alone: the nearest centroid weighted by its inputs' second moments
    alone, _ = assign(weight.reshape(-1, 8), centroids, importance=torch.diagonal(hessian).expand(weight.shape).reshape(-1, 8))
    codes = assign_codes_with_error_feedback(weight, hessian, centroids)
    assert codes.shape == alone.shape and int(codes.max()) < 16
    ours = output_error(weight, centroids[codes].reshape(weight.shape), hessian)
    theirs = output_error(weight, centroids[alone].reshape(weight.shape), hessian)
    assert ours < 0.95 * theirs, (ours, theirs)  # 0.50 against 0.55 here


def test_pq_error_feedback_with_uncorrelated_inputs_is_the_weighted_nearest_centroid():
    """A diagonal H: no later column can compensate, and a block's metric is its inputs' (damped) second moments."""
    weight, centroids, _ = _pq_layer()
    moments = torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5
    codes = assign_codes_with_error_feedback(weight, torch.diag(moments), centroids, damping=0.0)
    nearest, _ = assign(weight.reshape(-1, 8), centroids, importance=moments.expand(weight.shape).reshape(-1, 8))
    assert torch.equal(codes, nearest)
    with pytest.raises(ValueError, match="block size 7 does not divide"):
        assign_codes_with_error_feedback(weight, torch.eye(96), centroids[:, :7])


def test_least_squares_centroids_zero_the_output_error_gradient():
    weight, centroids, codes = _pq_layer()
    hessian = _correlated_inputs().float()
    rows = torch.rand(48, generator=torch.Generator().manual_seed(4)) + 0.1
    unused = int(torch.bincount(codes, minlength=17).argmin())  # give a 17th centroid no block
    start = torch.cat([centroids, torch.full((1, 8), 0.5)])
    fitted = fit_centroids_to_output(weight, hessian, codes, start, row_weights=rows, damping=1e-9)
    assert unused == 16 and torch.allclose(fitted[16], start[16], atol=1e-4)  # the ridge keeps it where it was
    c = fitted.double().requires_grad_(True)
    diff = weight.double() - c[codes].reshape(weight.shape)
    loss = (rows.double().unsqueeze(1) * (diff @ hessian.double()) * diff).sum()
    (grad,) = torch.autograd.grad(loss, c)
    assert grad.abs().max() < 1e-6 * loss.item()
    assert output_error(weight, fitted[codes].reshape(weight.shape), hessian) < output_error(weight, centroids[codes].reshape(weight.shape), hessian)


def test_output_objective_beats_its_kmeans_start():
    weight, centroids, codes = _pq_layer()
    hessian = _correlated_inputs()
    fitted, fitted_codes, reported = quantize_pq_to_output(weight, hessian, centroids)
    ours = output_error(weight, fitted[fitted_codes].reshape(weight.shape), hessian)
    assert reported == pytest.approx(ours, rel=1e-12)  # the error it returns is the pair's own
    assert ours < 0.9 * output_error(weight, centroids[codes].reshape(weight.shape), hessian)  # 0.47 against 0.55


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


def test_output_objective_keeps_kmeans_centroids_above_the_refit_limit(monkeypatch):
    """A codebook too large for the least-squares system (K=1024 x 8 takes minutes and GBs) gets its codes by error
    feedback and keeps k-means' centroids."""
    import quant_noise_plugin.gptq as gptq

    weight, centroids, _ = _pq_layer()
    hessian = _correlated_inputs()
    monkeypatch.setattr(gptq, "REFIT_UNKNOWNS", centroids.numel() - 1)
    fitted, codes, _ = quantize_pq_to_output(weight, hessian, centroids)
    assert torch.equal(fitted, centroids) and torch.equal(codes, assign_codes_with_error_feedback(weight, hessian, centroids))
