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


# --- pinned by hand: the defaults, the dead-input rule, the metric, the ridge, the rounds -----------------------------


def test_output_error_by_hand():
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    approx = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    hessian = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # rows' errors (0, 1) and (1, 0): 1 * 1 and 2 * 1; rows' w^T H w: 2 + 4 = 6 and 18
    assert output_error(weight, approx, hessian) == pytest.approx((1 + 2) / (6 + 18), rel=1e-12)
    assert output_error(weight, approx, hessian, row_weights=torch.tensor([3.0, 1.0])) == pytest.approx((3 + 2) / (18 + 18), rel=1e-12)
    assert output_error(weight, weight, hessian) == 0.0
    assert output_error(torch.zeros(2, 2), torch.zeros(2, 2), hessian) == 0.0  # nothing to lose: 0, not 0 / 0
    assert output_error(weight * 1e-3, approx * 1e-3, hessian) == pytest.approx(3 / 24, rel=1e-6)  # a ratio: no scale


def test_the_damping_adds_a_hundredth_of_the_mean_diagonal_and_a_dead_input_counts_as_unit():
    from quant_noise_plugin.gptq import _inverse_factor

    moments = torch.tensor([4.0, 0.0, 1.0, 3.0])  # input 1 never active
    u = _inverse_factor(torch.diag(moments), 0.01)
    damped = torch.tensor([4.0, 1.0, 1.0, 3.0]) + 0.01 * 9.0 / 4  # the dead input at 1, then 0.01 x the mean diagonal
    assert torch.allclose(u, torch.diag(damped.rsqrt()), atol=1e-6)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    default = quantize_with_error_feedback(weight, _correlated_inputs(cols=4), 3)
    explicit = quantize_with_error_feedback(weight, _correlated_inputs(cols=4), 3, damping=0.01)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def test_the_lazy_block_only_batches_the_update():
    """Columns updated a block at a time (block 16 here, 128 by default) give the codes one column at a time gives."""
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(5)) * 0.1
    hessian = _correlated_inputs()
    whole = quantize_with_error_feedback(weight, hessian, 3)
    for block in (16, 96, 128):
        assert torch.equal(quantize_with_error_feedback(weight, hessian, 3, block=block)[0], whole[0])


def test_a_dead_input_weighs_as_a_unit_input_in_the_pq_metric():
    weight, centroids, _ = _pq_layer()
    moments = torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5
    moments[5] = moments[17] = 0.0
    codes = assign_codes_with_error_feedback(weight, torch.diag(moments), centroids, damping=0.0)
    unit = moments.clone()
    unit[5] = unit[17] = 1.0
    nearest, _ = assign(weight.reshape(-1, 8), centroids, importance=unit.expand(weight.shape).reshape(-1, 8))
    assert torch.equal(codes, nearest)


def test_one_group_takes_the_centroid_nearest_in_the_damped_input_metric():
    """A weight one block wide: no later column compensates, so each row takes argmin_q (w - q)^T H' (w - q), with
    H' = H + 0.01 x its mean diagonal."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 4, generator=g) @ torch.randn(4, 4, generator=g)
    hessian = x.T @ x / 512
    weight, centroids = torch.randn(64, 4, generator=g), torch.randn(16, 4, generator=g)
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(4)
    diff = weight.unsqueeze(1) - centroids.unsqueeze(0)  # (rows, K, 4)
    costs = torch.einsum("rki,ij,rkj->rk", diff, damped, diff)
    assert torch.equal(assign_codes_with_error_feedback(weight, hessian, centroids), costs.argmin(dim=1))


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_the_centroid_refit_pulls_towards_the_start_by_a_hundredth_of_its_systems_mean_diagonal(scale):
    """At the solution, the output loss's gradient is 2 ridge (start - c), ridge = 0.01 x the mean diagonal of the
    loss's half Hessian (the normal equations' matrix), however small the inputs."""
    g = torch.Generator().manual_seed(6)
    weight, start = torch.randn(6, 4, generator=g), torch.randn(3, 2, generator=g)
    codes = torch.tensor([0, 1, 1, 2, 0, 0, 2, 1, 1, 1, 0, 2])
    x = torch.randn(64, 4, generator=g)
    hessian = (x.T @ x / 64).double() * scale
    rows = torch.rand(6, generator=g).double() + 0.5

    def loss(c):
        diff = weight.double() - c[codes].reshape(6, 4)
        return (rows.unsqueeze(1) * (diff @ hessian) * diff).sum()

    fitted = fit_centroids_to_output(weight, hessian.float(), codes, start, row_weights=rows.float()).double()
    half_hessian = torch.autograd.functional.hessian(loss, fitted).reshape(6, 6) / 2
    ridge = 0.01 * torch.diagonal(half_hessian).mean()
    (grad,) = torch.autograd.grad(loss(fitted.requires_grad_(True)), fitted)
    assert torch.allclose(grad, 2 * ridge * (start.double() - fitted.detach()), atol=1e-4 * scale)


def test_inputs_no_batch_reached_leave_the_centroids_where_they_started():
    weight, centroids, codes = _pq_layer()
    fitted = fit_centroids_to_output(weight, torch.zeros(96, 96), codes, centroids)
    assert torch.allclose(fitted, centroids, atol=1e-6)


def test_codes_and_centroids_alternate_twice_while_the_error_falls(monkeypatch):
    import quant_noise_plugin.gptq as gptq

    weight, centroids, _ = _pq_layer()
    hessian = _correlated_inputs()
    calls, errors = [], iter([0.5, 0.4, 0.3, 0.2])
    real = gptq.assign_codes_with_error_feedback
    monkeypatch.setattr(gptq, "assign_codes_with_error_feedback", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gptq, "output_error", lambda *a: next(errors))
    assert quantize_pq_to_output(weight, hessian, centroids)[2] == 0.4 and len(calls) == 2  # two rounds by default
    calls.clear()
    monkeypatch.setattr(gptq, "output_error", lambda *a: 0.5)  # no better: the first pair is kept, no third round
    first = quantize_pq_to_output(weight, hessian, centroids, rounds=3)
    assert len(calls) == 2 and torch.equal(first[1], real(weight, hessian, centroids))
    calls.clear()
    monkeypatch.setattr(gptq, "REFIT_UNKNOWNS", centroids.numel())  # at the limit: still refit
    refit = quantize_pq_to_output(weight, hessian, centroids)
    assert not torch.equal(refit[0], centroids)
    calls.clear()
    monkeypatch.setattr(gptq, "REFIT_UNKNOWNS", centroids.numel() - 1)  # past it: the codes alone, once
    quantize_pq_to_output(weight, hessian, centroids)
    assert len(calls) == 1
    assert gptq.REFIT_UNKNOWNS == 16 * 8 - 1 and monkeypatch.undo() is None and gptq.REFIT_UNKNOWNS == 512 * 8
