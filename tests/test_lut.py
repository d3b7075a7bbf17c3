"""PQ layers computing from their codes (lut.py, codes_weight.py): the lookup tables equal the decoded matmul on the
numba kernel and on the plain-torch path, an Embedding decodes only the rows it looks up, a codes-only model holds
no float weight of its PQ layers, and QUANT_NOISE_INFERENCE picks the form."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant_noise_plugin import codes_weight, inference, lut
from quant_noise_plugin.codes_weight import INFERENCE_SWITCH, PQCodesWeight
from quant_noise_plugin.compressed import attach_provider, free_dense_weight
from quant_noise_plugin.decoded import decoded, is_cached
from quant_noise_plugin.lut import NUMBA_SWITCH
from quant_noise_plugin.pq import PQCodebook
from quant_noise_plugin.providers import PQ_CHILD

KERNELS = ["numba", "torch"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Every test of the tables runs on the numba kernel and on the plain-torch path numba's absence leaves."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv(NUMBA_SWITCH, "1" if request.param == "numba" else "0")
    assert lut.numba_enabled() == (request.param == "numba")
    return request.param


def random_codebook(out_features, in_features, block, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codebook = PQCodebook((out_features, in_features), block, k)
    codebook.centroids.data.copy_(torch.randn(k, block, generator=generator))
    codebook.codes.copy_(torch.randint(0, k, codebook.codes.shape, generator=generator).to(codebook.codes.dtype))
    codebook.fitted.fill_(True)
    return codebook


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("block, k", [(4, 16), (8, 256), (16, 64), (8, 300)])  # 300: int16 codes
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5)])  # 2-D and 3-D inputs
def test_tables_equal_the_decoded_matmul(kernel, block, k, bias, rows):
    codebook = random_codebook(24, 64, block, k)
    weight = codebook().detach()
    codes = codebook.codes.view(24, -1)
    x = torch.randn(*rows, 64)
    b = torch.randn(24) if bias else None
    with torch.no_grad():
        out = lut.lut_linear(x, codebook.centroids.detach(), codes, b)
    expected = F.linear(x, weight, b)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-5


def test_the_reference_sums_the_table_entries_its_codes_name():
    """A direct check of the plain-torch gather (the numba kernel is checked against the decoded matmul above)."""
    tables = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # (rows, blocks, K)
    codes = torch.tensor([[0, 1, 2], [3, 3, 3], [1, 0, 0], [2, 2, 1], [0, 0, 0]], dtype=torch.uint8)  # 5 outputs (4 + 1)
    expected = torch.stack([torch.stack([sum(tables[n, j, int(codes[o, j])] for j in range(3)) for o in range(5)]) for n in range(2)])
    assert torch.equal(lut.gather_sum(tables, codes), expected)


def pq_layer(module, block=8, k=32, seed=0):
    codebook = random_codebook(*module.weight.shape, block, k, seed)
    attach_provider(module, PQ_CHILD, codebook)
    free_dense_weight(module)
    return codebook


class Tied(nn.Module):
    """An embedding and an output projection sharing one codebook, as fairseq's tied LM."""

    def __init__(self, vocab=50, dim=32, k=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, vocab, bias=False)
        self.codebook = random_codebook(vocab, dim, 8, k)
        for module in (self.embed, self.proj):
            attach_provider(module, PQ_CHILD, self.codebook)
            free_dense_weight(module)

    def forward(self, tokens):
        return self.proj(self.embed(tokens))


@pytest.mark.parametrize("lut_rows", [0, 64])  # a call over the tables' rows decodes for the call; under, the tables
@pytest.mark.parametrize("k", [16, 200])  # 4-bit codes (kept bit-packed) and 8-bit ones (a uint8 buffer)
def test_codes_only_model_equals_the_decoded_one_and_holds_no_float_weight(kernel, monkeypatch, lut_rows, k):
    monkeypatch.setattr(inference, "measured_lut_rows", lambda *args: lut_rows)
    model = Tied(k=k).eval()
    tokens = torch.randint(0, 50, (3, 7))
    weight = model.codebook().detach()
    expected = F.linear(F.embedding(tokens, weight), weight)
    monkeypatch.setenv(INFERENCE_SWITCH, "codes")
    with torch.no_grad():
        out = model(tokens)
    assert relative_error(out, expected) < 1e-5
    assert not is_cached(model.codebook) and model.codebook.compacted == (k == 16)  # nothing decoded kept; 4-bit codes in 4 bits
    held = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    assert all(t.shape != weight.shape or t.dtype != torch.float32 for t in model.parameters())  # no float (50, 32) weight
    assert inference.held_tensor_bytes(model) == sum(t.numel() * t.element_size() for t in model.codebook.parameters()) + sum(
        t.numel() * t.element_size() for t in model.codebook.buffers())
    assert len(held) == 3  # centroids, codes, fitted: the model's only tensors
    monkeypatch.setenv(INFERENCE_SWITCH, "decoded")
    with torch.no_grad():
        assert torch.allclose(model(tokens), out, atol=1e-5)
    assert is_cached(model.codebook)  # the decoded mode keeps its weight, and counts it
    assert inference.held_tensor_bytes(model) > weight.numel() * 4


def test_an_embedding_decodes_only_the_rows_it_looks_up(monkeypatch):
    embedding = nn.Embedding(40, 16)
    codebook = pq_layer(embedding, block=4, k=8)
    embedding.eval()
    weight = codebook().detach()
    tokens = torch.tensor([[3, 5, 3], [0, 39, 5]])
    monkeypatch.setenv(INFERENCE_SWITCH, "auto")

    def no_whole_weight(*args, **kwargs):
        raise AssertionError("the whole weight was decoded")

    monkeypatch.setattr(PQCodebook, "forward", no_whole_weight)
    monkeypatch.setattr(lut, "decode", no_whole_weight)
    with torch.no_grad():
        out = embedding(tokens)
    assert torch.equal(out, weight[tokens])
    monkeypatch.undo()
    monkeypatch.setenv(INFERENCE_SWITCH, "auto")
    with torch.no_grad():
        decoded(codebook)  # a tied output projection decoded the weight already: auto looks rows up in it
        assert inference.codes_weight(embedding, codebook) is None and torch.equal(embedding(tokens), out)
        codebook.__dict__.pop("_qn_decoded")
    assert isinstance(inference.codes_weight(embedding, codebook), PQCodesWeight)
    rows = torch.ones(40, dtype=torch.bool)
    rows[tokens.reshape(-1)] = False
    codebook.codes.view(40, -1)[rows] = (codebook.codes.view(40, -1)[rows] + 1) % 8  # rows not looked up: changed
    with torch.no_grad():
        assert torch.equal(embedding(tokens), out)


def test_auto_keeps_the_decoded_weight_where_the_tables_lose_and_training_never_sees_codes(monkeypatch):
    layer = nn.Linear(32, 16)
    codebook = pq_layer(layer, block=4, k=8)
    monkeypatch.setenv(INFERENCE_SWITCH, "auto")
    monkeypatch.setattr(inference, "measured_lut_rows", lambda *args: 4)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 32))  # 512 weights: under AUTO_MIN_WEIGHTS, the tables are not tried
    assert is_cached(codebook) and inference.codes_weight(layer, codebook) is None
    monkeypatch.setattr(inference, "AUTO_MIN_WEIGHTS", 0)
    monkeypatch.setattr(inference, "measured_lut_rows", lambda *args: 0)
    codebook.centroids.data = codebook.centroids.data.clone()  # new centroids (a load): the choice is made again
    assert inference.codes_weight(layer, codebook) is None  # measured slower at every row count
    monkeypatch.setattr(inference, "measured_lut_rows", lambda *args: 4)
    codebook.centroids.data = codebook.centroids.data.clone()
    assert isinstance(inference.codes_weight(layer, codebook), PQCodesWeight)
    layer.train()
    out = layer(torch.randn(2, 32))  # training: the decoded weight with its graph, never the codes
    out.sum().backward()
    assert codebook.centroids.grad is not None


def test_a_bad_mode_is_one_line(monkeypatch):
    monkeypatch.setenv(INFERENCE_SWITCH, "fast")
    with pytest.raises(ValueError, match="QUANT_NOISE_INFERENCE='fast': use auto, codes or decoded"):
        codes_weight.inference_mode()


def test_the_measurement_keeps_the_rows_up_to_the_first_loss(monkeypatch):
    """Timings faked (speed is for benchmarks): the tables take rows / 4 of the float path's time, except a
    lucky win again at 16 rows; "decoded" asks for a margin of MIN_SPEEDUP, "decode" only for a win."""

    def fake_time(fn, repeat, calls):
        if isinstance(fn, functools.partial):  # the tables: lut_linear(x, centroids, codes)
            rows = fn.args[0].shape[0]
            return 0.1 if rows == 16 else rows / 4
        return 1.0

    monkeypatch.setattr(codes_weight, "best_time", fake_time)
    measure = codes_weight.measured_lut_rows.__wrapped__
    assert measure(64, 32, 8, 16, "decode") == 4  # 1, 2, 4 win (4: a tie counts), 8 loses: 16 is never tried
    assert measure(64, 32, 8, 16, "decoded") == 2  # with the margin, 4 rows no longer win
    monkeypatch.setattr(codes_weight, "best_time", lambda fn, repeat, calls: 2.0 if isinstance(fn, functools.partial) else 1.0)
    assert measure(64, 32, 8, 16, "decode") == 0


@pytest.mark.parametrize("k", [16, 32, 1000])  # 4, 5 and 10 bits
def test_bit_packed_codes_compute_alike_and_save_as_before(kernel, k):
    """A codebook compacted for inference keeps its codes bit-packed (half a uint8 buffer at 4 bits); the tables,
    the rows an Embedding looks up and a decode read them alike, and its state dict is unchanged."""
    codebook = random_codebook(40, 32, 4, k, seed=1)
    plain_codes, weight, state = codebook.codes.clone(), codebook().detach(), codebook.state_dict()
    codebook.compact()
    assert codebook.compacted and "codes" not in codebook._buffers
    stored = sum(b.numel() * b.element_size() for b in codebook.buffers())
    assert stored <= 40 * 32 // 4 * codebook.code_bits / 8 + 3  # bits per code, 2 bytes of padding (+ the fitted flag)
    assert torch.equal(codebook.codes, plain_codes)
    codes = lut.BitCodes(codebook.codes_bitstream, codebook.code_bits, (40, 8))
    rows = torch.tensor([39, 0, 7, 7])
    assert torch.equal(codes.rows(rows), plain_codes.view(40, 8)[rows].long())
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert relative_error(lut.lut_linear(x, codebook.centroids.detach(), codes), F.linear(x, weight)) < 1e-5
    assert torch.equal(lut.embedding_rows(rows, codebook.centroids.detach(), codes), weight[rows])
    assert torch.equal(lut.decode(codebook.centroids.detach(), codes), weight)
    saved = codebook.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[key], state[key]) for key in state)
    codebook.load_state_dict(state)  # loading expands the codes again
    assert not codebook.compacted and torch.equal(codebook.codes, plain_codes)


def test_loading_the_kernels_keeps_numbas_compiler_trace_out_of_a_debug_root_logger():
    """fairseq sets the root logger to DEBUG at import (wav2vec2_classification's basicConfig); numba's compiler
    then logged ~16,000 lines per kernel into every fairseq CLI that loaded a packed model."""
    import logging

    pytest.importorskip("numba")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.DEBUG)  # as under fairseq's CLIs (pytest's own handlers keep fairseq's basicConfig from it)
    try:
        logging.getLogger("numba").setLevel(logging.NOTSET)
        lut._numba_kernels.cache_clear()
        lut._numba_kernels()
        assert not logging.getLogger("numba.core.byteflow").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(level)
