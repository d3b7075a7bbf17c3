"""The size accounting to the byte: for every stored format, sizes.py's count against a number computed by hand,
the packed tensors themselves, and the file as written (its container included). Fast: no fairseq, no k-means."""
import math

import pytest
import torch
from torch import nn

from quant_noise_plugin.activations import ActivationQuantizer
from quant_noise_plugin.checkpoints import write_checkpoint_atomically
from quant_noise_plugin.compressed import attach_activation_quantizer, attach_provider, free_dense_weight
from quant_noise_plugin.integrity import CHECKSUM_KEY, with_checksums
from quant_noise_plugin.packing import pack_state_dict, predicted_file
from quant_noise_plugin.pq import PQCodebook
from quant_noise_plugin.providers import PQ_CHILD, SCALAR_CHILD
from quant_noise_plugin.scalar import ScalarCodes
from quant_noise_plugin.sizes import dense_fp32_bytes, pq_bytes, scalar_bytes, serialized_bytes, size_rows


def fitted_codebook(shape, block_size, n_centroids, seed=0):
    """A fitted codebook with random codes (every code value used) and centroids: sizes depend on shapes only."""
    g = torch.Generator().manual_seed(seed)
    codebook = PQCodebook(shape, block_size, n_centroids)
    with torch.no_grad():
        codebook.centroids.copy_(torch.randn(n_centroids, block_size, generator=g))
        codes = torch.randint(0, n_centroids, (codebook.n_blocks,), generator=g)
        codes[:n_centroids] = torch.arange(n_centroids)
        codebook.codes.copy_(codes.to(codebook.codes.dtype))
        codebook.fitted.fill_(True)
    return codebook


def compress(layer, provider, child=PQ_CHILD):
    attach_provider(layer, child, provider)
    free_dense_weight(layer)
    return layer


def stored_bytes(packed, prefix=""):
    """The bytes of the packed tensors under ``prefix``, each storage once (what torch.save writes as data)."""
    seen, total = set(), 0
    for key, tensor in packed.items():
        if key.startswith(prefix) and key != CHECKSUM_KEY:
            storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if storage not in seen:
                seen.add(storage)
                total += storage[1]
    return total


def row(model, name, **kwargs):
    return next(r for r in size_rows(model, **kwargs) if r.name == name)


# K, bits per code: 1 to 16 bits, byte-aligned and not, and K just past a power of two
@pytest.mark.parametrize("n_centroids, bits", [(2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (32, 5), (100, 7), (256, 8), (257, 9),
                                               (1024, 10), (4096, 12), (65536, 16)])
def test_pq_rows_count_the_bit_packed_codes_and_fp16_centroids_to_the_byte(n_centroids, bits):
    block_size = 4
    rows_, cols = (512, 512) if n_centroids > 4096 else (97, 200)  # 4850 blocks: n_blocks * bits is not a multiple of 8
    layer = compress(nn.Linear(cols, rows_, bias=False), fitted_codebook((rows_, cols), block_size, n_centroids))
    n_blocks = rows_ * cols // block_size
    by_hand = math.ceil(n_blocks * bits / 8) + n_centroids * block_size * 2 + 1  # codes, fp16 centroids, fitted flag
    model = nn.Sequential(layer)
    r = row(model, "0")
    assert (r.method, r.block_size, r.n_centroids) == ("pq", block_size, n_centroids)
    assert r.bytes == by_hand == pq_bytes((rows_, cols), block_size, n_centroids)
    assert r.bytes == stored_bytes(pack_state_dict(model), "0.")
    assert r.bits_per_weight == pytest.approx(8 * by_hand / (rows_ * cols), rel=1e-12)


@pytest.mark.parametrize("centroid_bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pq_rows_with_int_centroids_count_a_byte_a_centroid_value_and_one_scale(centroid_bits, symmetric):
    layer = compress(nn.Linear(64, 48, bias=False), fitted_codebook((48, 64), 8, 32))
    model = nn.Sequential(layer)
    by_hand = math.ceil(48 * 64 // 8 * 5 / 8) + 32 * 8 + 4 + 4 + 1  # 5-bit codes, K x bs uint8, fp32 scale and zero point, flag
    r = row(model, "0", centroid_bits=centroid_bits)
    assert r.method == f"pq+int{centroid_bits}" and r.bytes == by_hand
    assert r.bytes == stored_bytes(pack_state_dict(model, centroid_bits=centroid_bits, symmetric=symmetric), "0.")
    assert r.bytes == pq_bytes((48, 64), 8, 32, centroid_bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_int_rows_count_the_codes_and_a_scale_and_zero_point_per_row_or_tensor(bits, per_channel):
    torch.manual_seed(0)
    layer = nn.Linear(30, 22)  # 660 weights: 3-bit codes end mid-byte
    codes = ScalarCodes(layer.weight.shape, bits, per_channel=per_channel).fit(layer.weight)
    model = nn.Sequential(compress(layer, codes, SCALAR_CHILD))
    n_scales = 22 if per_channel else 1
    by_hand = math.ceil(660 * bits / 8) + n_scales * (4 + 4) + 1  # codes, fp32 scale and zero point each, the bit count
    r = row(model, "0")
    assert r.method == f"int{bits}" and r.bytes == by_hand == scalar_bytes((22, 30), bits, n_scales)
    assert r.bytes == stored_bytes(pack_state_dict(model), "0.weight_int.")
    assert r.bits_per_weight == pytest.approx(8 * by_hand / 660, rel=1e-12)
    bias = row(model, "0.bias")
    assert (bias.method, bias.bytes, bias.bits_per_weight) == ("fp16", 22 * 2, 16.0)
    assert bias.bytes == stored_bytes(pack_state_dict(model), "0.bias")
    assert row(model, "0.bias", float_bytes=4).bytes == 22 * 4 and row(model, "0.bias", float_bytes=4).method == "fp32"


class TiedLM(nn.Module):
    """A PQ embedding tied to the output projection, an int4 Linear with int8 inputs, a LayerNorm, an int buffer
    (stored as it is) and a non-persistent buffer (not stored)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 24)
        self.norm = nn.LayerNorm(24)
        self.out = nn.Linear(16, 40, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("temperature", torch.tensor(1.0))  # one element
        self.register_buffer("nothing", torch.zeros(0))  # none: no bytes, no bits
        self.register_buffer("scratch", torch.zeros(1000), persistent=False)
        codebook = fitted_codebook((40, 16), 4, 8)
        compress(self.embed, codebook)
        compress(self.out, codebook)
        compress(self.fc, ScalarCodes(self.fc.weight.shape, 4).fit(self.fc.weight), SCALAR_CHILD)
        attach_activation_quantizer(self.fc, ActivationQuantizer(0.05, 3))


def test_a_whole_model_counts_each_tensor_once_and_the_file_is_its_prediction(tmp_path):
    model = TiedLM()
    rows = {r.name: r for r in size_rows(model)}
    assert list(rows) == ["embed", "fc", "fc.input_quant", "fc.bias", "norm.weight", "norm.bias", "steps", "temperature", "nothing"]
    by_hand = {
        "embed": 160 * 3 // 8 + 8 * 4 * 2 + 1,  # 160 blocks of 3-bit codes, 8 x 4 fp16 centroids, flag: tied, counted once
        "fc": 24 * 16 // 2 + 24 * 8 + 1,  # int4 per row
        "fc.input_quant": 4 + 4 + 1,  # fp32 scale, int32 zero point, uint8 bits
        "fc.bias": 24 * 2, "norm.weight": 24 * 2, "norm.bias": 24 * 2,  # fp16
        "steps": 3 * 8,  # int64 as it is
        "temperature": 2,
        "nothing": 0,
    }
    assert {name: r.bytes for name, r in rows.items()} == by_hand
    weights = {"embed": 640, "fc": 384, "fc.bias": 24, "norm.weight": 24, "norm.bias": 24, "steps": 3, "temperature": 1}
    assert {name: r.bits_per_weight for name, r in rows.items()} == {**{n: 8 * by_hand[n] / w for n, w in weights.items()},
                                                                     "fc.input_quant": 0.0, "nothing": 0.0}  # no weights of its own
    packed = pack_state_dict(model)
    assert stored_bytes(packed) == sum(by_hand.values())  # every row is what the packed file holds, and nothing else
    assert dense_fp32_bytes(model) == 4 * (40 * 16 + 24 * 16 + 24 + 24 + 24 + 1)  # the tied weight once, no int buffer

    state = {"cfg": {"model": "tiny"}, "extra_state": {"epoch": 1}}
    predicted = predicted_file(model, state)
    assert predicted["compressed_bytes"] == sum(by_hand.values())
    packed_state = {**state, "model": packed_model_state(model)}
    written = write_checkpoint_atomically(packed_state, tmp_path / "packed.pt")
    assert predicted["predicted_packed_file_bytes"] == written == (tmp_path / "packed.pt").stat().st_size
    # the container's own bytes: what the file adds to the tensors' (zip records, pickled keys and config, checksums)
    container = written - sum(by_hand.values())
    assert 0 < container == serialized_bytes(packed_state) - stored_bytes(packed)


def packed_model_state(model):
    """The model entry `quant-noise pack` writes: the packed tensors and their checksum table."""
    return with_checksums(pack_state_dict(model))


def test_one_more_tensor_costs_its_bytes_in_the_rows_and_in_the_file(tmp_path):
    """A tensor added to the model adds exactly its fp16 bytes to the count and to the file's data."""
    model = TiedLM()
    before = predicted_file(model, {})
    model.register_buffer("extra", torch.zeros(1000))
    after = predicted_file(model, {})
    assert after["compressed_bytes"] - before["compressed_bytes"] == 2000
    assert after["predicted_packed_file_bytes"] - before["predicted_packed_file_bytes"] >= 2000
    written = write_checkpoint_atomically({"model": packed_model_state(model)}, tmp_path / "extra.pt")
    assert written == after["predicted_packed_file_bytes"]


def test_unfitted_codebooks_and_stale_dense_copies_are_not_counted():
    """A training model mid-schedule: a layer whose stage has not come keeps its dense weight (fp16 in the count); a
    fitted layer that still holds its dense Parameter counts its codes only."""
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False))
    attach_provider(model[0], PQ_CHILD, fitted_codebook((8, 16), 4, 4))  # fitted, dense Parameter kept (training)
    attach_provider(model[1], PQ_CHILD, PQCodebook((8, 16), 4, 4))  # not fitted yet
    rows = {r.name: r.bytes for r in size_rows(model)}
    assert rows == {"0": 32 * 2 // 8 + 4 * 4 * 2 + 1, "1.weight": 8 * 16 * 2}
