"""PQ codebooks pinned by hand (pq.py; fast, plain torch): shape checks, the centroids' mean gradient, codes kept
bit-packed in memory, reassignment, and every form a state dict may hold them in (packed, int centroids, dense)."""
import pytest
import torch

from quant_noise_plugin.bitpack import pack_bits
from quant_noise_plugin.pq import COMPACT_CODES, PQCodebook, check_pq_shape
from quant_noise_plugin.scalar import dequantize


def codebook_with(codes, centroids, shape):
    codebook = PQCodebook(shape, centroids.shape[1], centroids.shape[0])
    with torch.no_grad():
        codebook.centroids.copy_(centroids)
        codebook.codes.copy_(torch.as_tensor(codes).to(codebook.codes.dtype))
        codebook.fitted.fill_(True)
    return codebook


@pytest.mark.parametrize("shape, block_size, n_centroids, message", [
    ((6, 10), 4, 2, "layer x (shape (6, 10)): block_size 4 does not divide its input dimension 10"),
    ((10, 6), 4, 2, "layer x (shape (10, 6)): block_size 4 does not divide its input dimension 6"),
    ((2, 3, 8), 3, 2, "layer x (shape (2, 3, 8)): block_size 3 does not divide its input dimension 8"),
    ((6, 8), 0, 2, "block_size 0 does not divide"),
    ((6, 8), 4, 13, "layer x (shape (6, 8)): n_centroids 13 but only 12 blocks of size 4"),
    ((6, 8), 4, 0, "n_centroids 0 but only 12 blocks"),
])
def test_shapes_a_codebook_cannot_take_are_refused_naming_the_layer(shape, block_size, n_centroids, message):
    with pytest.raises(ValueError) as err:
        check_pq_shape("x", shape, block_size, n_centroids)
    assert message in str(err.value)


@pytest.mark.parametrize("shape, block_size, n_centroids", [((6, 8), 4, 12), ((6, 8), 4, 1), ((6, 8), 1, 48), ((2, 3, 8), 8, 6)])
def test_the_limits_themselves_are_taken(shape, block_size, n_centroids):
    check_pq_shape("x", shape, block_size, n_centroids)


def test_each_centroid_steps_by_the_mean_gradient_of_its_blocks():
    """5 centroids of 4: centroid 0 used by one block, 1 by three, 4 by none (its gradient stays 0)."""
    codebook = codebook_with([0, 1, 1, 1, 2, 3], torch.zeros(5, 4), (3, 8))
    grad = torch.arange(24, dtype=torch.float32).reshape(3, 8) * 0.37 - 2.0
    codebook().backward(grad)
    blocks = grad.reshape(6, 4)
    expected = torch.stack([blocks[0], blocks[1:4].mean(0), blocks[4], blocks[5], torch.zeros(4)])
    assert torch.allclose(codebook.centroids.grad, expected, rtol=1e-6, atol=1e-6)


def test_codes_kept_bit_packed_in_memory_read_and_save_as_the_codes():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (40,))
    codebook = codebook_with(codes, torch.randn(16, 2), (8, 10))
    codebook.compact()
    assert codebook.compacted and "codes" not in codebook._buffers
    stream = codebook._buffers[COMPACT_CODES]
    assert torch.equal(stream[:-2], pack_bits(codes, 4)) and stream.numel() == 40 * 4 // 8 + 2  # 2 spare bytes
    assert torch.equal(codebook.codes.long(), codes) and codebook.codes.dtype == torch.uint8
    assert codebook.centroids.shape == (16, 2)  # other attributes read as ever
    state = codebook.state_dict()
    assert set(state) == {"centroids", "codes", "fitted"} and torch.equal(state["codes"].long(), codes)
    codebook.compact()  # again: nothing changes
    assert torch.equal(codebook._buffers[COMPACT_CODES], stream)
    dense = codebook()
    codebook.fit(dense, n_iter=2, backend="torch")  # fitting expands the codes again
    assert not codebook.compacted and "codes" in codebook._buffers


@pytest.mark.parametrize("n_centroids", [256, 65536])
def test_byte_wide_codes_are_not_compacted(n_centroids):
    codebook = PQCodebook((512, 512), 4, n_centroids)
    codebook.compact()
    assert not codebook.compacted and "codes" in codebook._buffers


def test_fit_defaults_are_twenty_iterations_from_seed_0_on_any_backend(monkeypatch):
    from quant_noise_plugin import pq

    asked = []
    real = pq.kmeans
    monkeypatch.setattr(pq, "kmeans", lambda *a, **kw: asked.append(kw) or real(*a, **{**kw, "backend": "torch"}))
    codebook = PQCodebook((16, 32), 4, 8)
    codebook.fit(torch.randn(16, 32, generator=torch.Generator().manual_seed(1)))
    assert (asked[0]["n_iter"], asked[0]["seed"], asked[0]["backend"], asked[0]["importance"]) == (20, 0, "auto", None)
    assert bool(codebook.fitted)


def test_fit_on_the_output_objective_takes_a_non_square_weight():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 8, generator=g)
    x = torch.randn(256, 8, generator=g)
    codebook = PQCodebook((12, 8), 4, 4)
    error = codebook.fit(weight, n_iter=5, backend="torch", hessian=x.T @ x / 256)
    assert codebook().shape == (12, 8) and 0 < error < 1


def test_reassign_reports_the_error_before_and_after_moving_codes():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
    codebook = codebook_with([1, 1], centroids, (1, 4))
    codebook.keep_target()
    codebook.target.copy_(torch.tensor([[1.0, 2.0, 3.0, 2.0]]))  # blocks (1, 2) and (3, 2), both on (1, 1)
    moved, before, after = codebook.reassign()
    assert moved == 0.5 and before == 0 + 1 + 4 + 1 and after == (0 + 1) + (0 + 1)  # -> codes 1 and 2
    assert codebook.codes.tolist() == [1, 2]
    codebook.codes.copy_(torch.tensor([1, 1], dtype=torch.uint8))
    importance = torch.tensor([[2.0, 1.0, 1.0, 3.0]])
    moved, before, after = codebook.reassign(importance)
    assert before == 2 * 0 + 1 * 1 + 1 * 4 + 3 * 1 and after == 1 * 1 + 3 * 1


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_centroids_load_back_as_their_exact_values_with_their_codes(symmetric):
    codebook = codebook_with([0, 1, 2, 3], torch.tensor([[0.5, 1.0], [2.0, 3.0], [-1.0, 0.25], [0.0, 0.0]]), (2, 4))
    state = codebook.packed_state(centroid_bits=8, symmetric=symmetric)
    assert "centroids" not in state and float(state["centroids_zero_point"]) == (128 if symmetric else 64)
    assert set(codebook.packed_state(centroid_bits=8)) == set(state) and torch.equal(  # asymmetric unless asked
        codebook.packed_state(centroid_bits=8)["centroids_zero_point"], codebook.packed_state(centroid_bits=8, symmetric=False)["centroids_zero_point"])
    fresh = PQCodebook((2, 4), 2, 4)
    fresh.load_state_dict(dict(state))  # strict: every packed key is consumed
    values = dequantize(state["centroids_codes"], state["centroids_scale"], state["centroids_zero_point"])
    assert torch.equal(fresh.centroids.detach(), values) and torch.equal(fresh.codes, codebook.codes)
    codes, scale, zero_point = fresh.centroid_codes
    assert torch.equal(codes, state["centroids_codes"]) and torch.equal(scale, state["centroids_scale"])
    assert torch.equal(zero_point, state["centroids_zero_point"])
    fresh.load_state_dict(codebook.state_dict())  # a float state: no int codes any more
    assert fresh.centroid_codes is None


def test_a_target_in_the_state_is_kept_and_a_missing_one_is_what_the_codes_decode_to():
    codebook = codebook_with([1, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (1, 4))
    state = codebook.state_dict()
    fresh = PQCodebook((1, 4), 2, 2)
    fresh.keep_target()
    fresh.load_state_dict(dict(state))
    assert fresh.target.tolist() == [[3.0, 4.0, 1.0, 2.0]]
    fresh.load_state_dict({**state, "target": torch.tensor([[9.0, 9.0, 9.0, 9.0]])})
    assert fresh.target.tolist() == [[9.0, 9.0, 9.0, 9.0]]
    plain = PQCodebook((1, 4), 2, 2)
    plain.load_state_dict({**state, "target": torch.zeros(1, 4)})  # a training checkpoint read for inference
    assert "target" not in plain._buffers


def test_a_dense_checkpoint_leaves_the_codebook_as_it_is():
    """A model state without codebook keys (the trained model an iPQ run starts from) loads, strict, around it."""
    codebook = PQCodebook((2, 4), 2, 2)
    with torch.no_grad():
        codebook.centroids.fill_(7.0)
    codebook.load_state_dict({})
    assert not bool(codebook.fitted) and bool((codebook.centroids == 7.0).all())
    fitted = codebook_with([1, 0, 1, 1], torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (2, 4))
    codebook.load_state_dict(fitted.state_dict())
    assert bool(codebook.fitted) and torch.equal(codebook(), fitted())
