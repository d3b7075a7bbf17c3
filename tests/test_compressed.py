"""The compressed format in-process: attach, size accounting, packing, reloading (no fairseq)."""
import io

import torch
from torch import nn

from quant_noise_plugin.compressed import attach_from_state_dict, attach_pq_plan, fit_pq, provider_of, scalar_quantize_remaining_
from quant_noise_plugin.packing import pack_state_dict
from quant_noise_plugin.sizes import dense_fp32_bytes, size_rows
from quant_noise_plugin.schedule import LayerPlan


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16, padding_idx=1)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(16, 64, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x)
        return self.out(h + self.fc(h)[..., :16])


def compressed_model():
    torch.manual_seed(0)
    model = Tied()
    emb = LayerPlan(["emb", "out"], "Embedding", [64, 16], 4, 8)
    fc = LayerPlan(["fc"], "Linear", [32, 16], 4, 8)
    for plan in (emb, fc):
        attach_pq_plan(model, plan)
        fit_pq(model, plan, n_iter=5, seed=0, backend="torch")
    return model


def test_tied_weights_share_one_codebook_and_are_counted_once():
    model = compressed_model()
    assert provider_of(model.emb) is provider_of(model.out)
    rows = {r.name: r for r in size_rows(model)}
    assert [n for n, r in rows.items() if r.method == "pq"] == ["emb", "fc"]
    # 64x16 weights, blocks of 4, 8 centroids: 256 codes x 3 bits + 8x4 fp16 centroids + flag
    assert rows["emb"].bytes == 96 + 64 + 1
    assert set(rows) == {"emb", "fc", "fc.bias"}
    assert dense_fp32_bytes(model) == 4 * (64 * 16 + 32 * 16 + 32)


def test_packed_state_reloads_into_a_fresh_model_with_the_same_outputs():
    model = compressed_model().eval()
    x = torch.randint(0, 64, (3, 5))
    expected = model(x)
    packed = pack_state_dict(model)
    assert packed["emb.weight_pq.codes_packed"] is packed["out.weight_pq.codes_packed"]  # stored once
    assert packed["emb.weight_pq.codes_packed"].numel() == 256 * 3 // 8
    assert "emb.weight" not in packed and packed["fc.bias"].dtype == torch.float16
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    fresh = Tied().eval()
    assert attach_from_state_dict(fresh, state) == 2
    fresh.load_state_dict(state)
    assert fresh.emb._parameters["weight"] is None  # inference keeps the compressed form only
    assert torch.allclose(fresh(x), expected, atol=1e-2)  # fp16 centroids and bias
    assert fresh.emb.padding_idx == 1


def test_codes_wider_than_a_byte_are_bit_packed_as_the_size_report_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128))
    plan = LayerPlan(["0"], "Linear", [128, 64], 4, 1024)  # 2048 blocks, 10-bit codes
    attach_pq_plan(model, plan)
    fit_pq(model, plan, n_iter=2, seed=0, backend="torch")
    assert provider_of(model[0]).codes.dtype == torch.int16
    packed = pack_state_dict(model)
    assert packed["0.weight_pq.codes_packed"].numel() == 2048 * 10 // 8  # not 2048 * 2 bytes of int16
    row = next(r for r in size_rows(model) if r.name == "0")
    assert row.bytes == 2048 * 10 // 8 + 1024 * 4 * 2 + 1  # codes, fp16 centroids, fitted flag: what is stored
    x = torch.randn(3, 64)
    expected = model(x)
    fresh = nn.Sequential(nn.Linear(64, 128))
    assert attach_from_state_dict(fresh, packed) == 1
    fresh.load_state_dict(packed)
    assert torch.equal(provider_of(fresh[0]).codes, provider_of(model[0]).codes)
    assert torch.allclose(fresh(x), expected, atol=1e-2)


def test_int_codes_for_the_remaining_layers():
    torch.manual_seed(0)
    model = Tied().eval()
    dense = {"emb": model.emb.weight.detach().clone(), "fc": model.fc.weight.detach().clone()}
    assert sorted(scalar_quantize_remaining_(model, 4)) == ["emb", "fc"]
    assert model.fc._parameters["weight"] is None and provider_of(model.out) is provider_of(model.emb)
    for name, weight in dense.items():
        codes = provider_of(getattr(model, name))
        assert codes.scale.shape == (weight.shape[0], 1)  # per output row
        assert ((codes() - weight).abs() <= codes.scale / 2 + 1e-6).all()
    rows = {r.name: r for r in size_rows(model)}
    assert rows["fc"].method == "int4" and rows["fc"].bytes == 32 * 16 // 2 + 32 * 8 + 1
