"""k-means, PQ codebooks and bit packing (plain torch)."""
import pytest
import torch

from quant_noise_plugin.bitpack import bits_for, pack_bits, smallest_int_dtype, unpack_bits
from quant_noise_plugin.kmeans import assign, kmeans
from quant_noise_plugin.pq import PQCodebook


def _blocks(n=4096, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def test_torch_kmeans_objective_never_increases_and_beats_random_assignment():
    x = _blocks()
    result = kmeans(x, 64, n_iter=15, seed=0, backend="torch")
    hist = result.history
    assert all(b <= a + 1e-3 for a, b in zip(hist, hist[1:])), hist
    random_centroids = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:64]]
    _, random_dists = assign(x, random_centroids)
    assert result.objective < 0.8 * random_dists.sum().item()
    # the reported objective is the true one of the returned codebook
    _, d = assign(x, result.centroids)
    assert abs(d.sum().item() - result.objective) < 1e-3 * result.objective


def test_faiss_kmeans_uses_every_block_and_is_deterministic():
    x = _blocks(n=20000)
    a = kmeans(x, 256, n_iter=10, seed=3, backend="faiss")
    b = kmeans(x, 256, n_iter=10, seed=3, backend="faiss")
    assert torch.equal(a.assignments, b.assignments)
    t = kmeans(x, 256, n_iter=10, seed=3, backend="torch")
    assert a.objective < 1.05 * t.objective
    assert torch.bincount(a.assignments, minlength=256).min() > 0  # no empty cluster left


def test_faiss_kmeans_centroids_are_the_means_of_all_their_blocks():
    """20,000 blocks, 16 centroids: faiss would train on 16 x 256 sampled blocks by default; every
    converged centroid must be the mean of all the blocks assigned to it, not of a sample."""
    g = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(16, 8, generator=g)
    x = centers[torch.arange(20000) % 16] + torch.randn(20000, 8, generator=g)
    result = kmeans(x, 16, n_iter=50, seed=0, backend="faiss")
    for c in range(16):
        members = x[result.assignments == c]
        assert torch.allclose(result.centroids[c], members.mean(0), atol=1e-4), c


def test_kmeans_handles_duplicate_points_and_rejects_too_many_centroids():
    x = torch.zeros(100, 4)
    x[50:] = 1.0
    result = kmeans(x, 8, n_iter=5, backend="torch")
    assert result.objective == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="32 centroids for only 16 blocks"):
        kmeans(torch.randn(16, 4), 32)


def test_pq_layer_reproduces_centroids_gathered_by_codes_exactly():
    w = torch.randn(48, 32)
    cb = PQCodebook(w.shape, 4, 16)
    cb.fit(w, n_iter=10, backend="torch")
    assert cb.codes.dtype == torch.uint8
    expected = cb.centroids[cb.codes.long()].reshape(48, 32)
    assert torch.equal(cb(), expected)
    assert torch.equal(expected.reshape(-1, 4)[5], cb.centroids[int(cb.codes[5])])


def test_centroid_gradient_is_the_mean_over_its_blocks():
    cb = PQCodebook((4, 4), 2, 2)
    with torch.no_grad():
        cb.codes.copy_(torch.tensor([0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.uint8))
    grad = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    (cb() * grad).sum().backward()
    blocks = grad.reshape(8, 2)
    codes = cb.codes.long()
    assert torch.allclose(cb.centroids.grad[0], blocks[codes == 0].mean(0))
    assert torch.allclose(cb.centroids.grad[1], blocks[codes == 1].mean(0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 10, 13, 15, 17])
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def test_bits_per_code():
    assert [bits_for(k) for k in (1, 2, 3, 4, 5, 256, 257, 1024, 65536)] == [1, 1, 2, 2, 3, 8, 9, 10, 16]


def test_smallest_integer_types():
    assert smallest_int_dtype(256) == torch.uint8
    assert smallest_int_dtype(257) == torch.int16
    assert smallest_int_dtype(2**15) == torch.int16  # codes up to 32767: int16's largest
    assert smallest_int_dtype(2**15 + 1) == torch.int32
    assert smallest_int_dtype(70000) == torch.int32


def test_bit_packing_takes_1_to_32_bits_and_codes_that_fit():
    codes = torch.tensor([0, 2**32 - 1, 12345])
    assert torch.equal(unpack_bits(pack_bits(codes, 32), 32, 3), codes)
    for bits in (0, 33):
        with pytest.raises(ValueError, match=f"pack_bits supports 1..32 bits, got {bits}"):
            pack_bits(codes, bits)
    assert torch.equal(unpack_bits(pack_bits(torch.tensor([7, 0]), 3), 3, 2), torch.tensor([7, 0]))  # 2**bits - 1 fits
    with pytest.raises(ValueError, match="a code 8 does not fit in 3 bits"):
        pack_bits(torch.tensor([8, 0]), 3)


def _weighted_layer(seed=0):
    """A 128 x 64 layer in blocks of 8 whose inputs' second moments span two orders of magnitude per column."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(128, 64, generator=g)
    importance = torch.exp(2.0 * torch.randn(1, 64, generator=g))
    return weight, importance


def _weighted_error(weight, importance, codebook):
    return float((importance.expand_as(weight) * (weight - codebook()) ** 2).sum())


def test_activation_weighted_kmeans_lowers_the_weighted_error_of_a_fixed_layer():
    weight, importance = _weighted_layer()
    plain, weighted = PQCodebook(weight.shape, 8, 32), PQCodebook(weight.shape, 8, 32)
    plain.fit(weight, n_iter=30, seed=0, backend="torch")
    objective = weighted.fit(weight, n_iter=30, seed=0, backend="torch", importance=importance)
    assert objective == pytest.approx(_weighted_error(weight, importance, weighted), rel=1e-4)
    assert _weighted_error(weight, importance, weighted) < 0.7 * _weighted_error(weight, importance, plain)
    # and it pays for it in the plain weight error: what it minimizes is not ||W - What||^2
    assert float(((weight - weighted()) ** 2).sum()) > float(((weight - plain()) ** 2).sum())


def test_weighted_kmeans_assigns_by_and_averages_with_the_weights():
    """Converged: each block's code is its nearest centroid under the weighted distance, and each centroid
    coordinate is the importance-weighted mean of its blocks' coordinates."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g)
    w = torch.rand(3000, 8, generator=g) ** 3 + 0.01  # per point and per coordinate
    result = kmeans(x, 16, n_iter=100, seed=0, backend="torch", importance=w)
    distances = (w.unsqueeze(1) * (x.unsqueeze(1) - result.centroids.unsqueeze(0)) ** 2).sum(-1)
    assert torch.equal(result.assignments, distances.argmin(1))
    for c in range(16):
        members = result.assignments == c
        mean = (w[members] * x[members]).sum(0) / w[members].sum(0)
        assert torch.allclose(result.centroids[c], mean, atol=1e-4), c


def test_equal_weights_give_plain_kmeans():
    weight, _ = _weighted_layer()
    blocks = weight.reshape(-1, 8)
    plain = kmeans(blocks, 32, n_iter=20, seed=3, backend="torch")
    uniform = kmeans(blocks, 32, n_iter=20, seed=3, backend="auto", importance=torch.full((1, 8), 2.5))
    assert torch.equal(plain.assignments, uniform.assignments)
    assert torch.allclose(plain.centroids, uniform.centroids, atol=1e-5)
    assert uniform.objective == pytest.approx(2.5 * plain.objective, rel=1e-4)


@pytest.mark.parametrize(
    "importance, backend, message",
    [
        (-torch.ones(1, 8), "torch", "importance must be non-negative"),
        (torch.ones(1, 4), "torch", "importance of shape (1, 4) does not broadcast to the points' (256, 8)"),
        (torch.ones(8), "torch", "importance of shape (8,)"),
        (torch.ones(1, 8), "faiss", "the faiss backend has no per-coordinate weights"),
    ],
)
def test_bad_importance_is_refused(importance, backend, message):
    with pytest.raises(ValueError) as err:
        kmeans(torch.randn(256, 8), 4, backend=backend, importance=importance)
    assert message in str(err.value)


def test_reassign_moves_codes_to_the_centroid_nearest_the_fitted_weight():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    importance = torch.rand(1, 32) + 0.1
    book = PQCodebook(weight.shape, 4, 8)
    book.keep_target()
    book.fit(weight, n_iter=5, seed=0, backend="torch", importance=importance)
    assert torch.equal(book.target, weight)
    assert book.reassign(importance)[0] == 0.0  # fitted codes are already the nearest (k-means converged or not: final assign)
    with torch.no_grad():
        book.centroids.add_(0.5 * torch.randn_like(book.centroids))  # as finetuning moves them
    codes_before = book.codes.clone()
    moved, before, after = book.reassign(importance)
    blocks, weights = weight.reshape(-1, 4), importance.expand(16, 32).reshape(-1, 4)
    errors = (weights.unsqueeze(1) * (blocks.unsqueeze(1) - book.centroids.detach().unsqueeze(0)) ** 2).sum(-1)
    assert torch.equal(book.codes.long(), errors.argmin(1))  # the weighted nearest, not the plain one
    assert moved == pytest.approx(float((book.codes != codes_before).float().mean())) and moved > 0.2
    assert after == pytest.approx(float(errors.min(1).values.sum()), rel=1e-5) and after < before
    assert not torch.equal(errors.argmin(1), ((blocks.unsqueeze(1) - book.centroids.detach().unsqueeze(0)) ** 2).sum(-1).argmin(1))


def test_reassign_target_is_kept_in_training_state_only():
    weight = torch.randn(8, 16)
    book = PQCodebook(weight.shape, 4, 4)
    book.keep_target()
    book.fit(weight, n_iter=3, backend="torch")
    state = book.state_dict()
    assert torch.equal(state["target"], weight) and "target" not in book.packed_state()
    frozen = PQCodebook(weight.shape, 4, 4)  # inference or a schedule without moving codes: the target is dropped
    frozen.load_state_dict(dict(state))
    assert "target" not in frozen.state_dict() and torch.equal(frozen.codes, book.codes)
    older = PQCodebook(weight.shape, 4, 4)  # fitted by a schedule without it: the target is what the codes decode to
    older.keep_target()
    older.load_state_dict({k: v for k, v in state.items() if k != "target"})
    assert torch.equal(older.target, book().detach()) and older.reassign()[0] == 0.0
    with pytest.raises(RuntimeError, match="keep_target"):
        frozen.reassign()
