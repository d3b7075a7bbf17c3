"""int2-int8 scalar quantization pinned to hand-computed codes, scales and zero points (scalar.py; fast, plain torch)."""
import pytest
import torch

from quant_noise_plugin.errors import QuantNoiseError
from quant_noise_plugin.scalar import ScalarCodes, affine_params, check_bits, dequantize, fake_quantize, quantize


def test_only_the_supported_widths_are_taken():
    for bits in (2, 3, 4, 8):
        check_bits(bits)
    for bits in (1, 5, 16):
        with pytest.raises(QuantNoiseError, match=rf"--scalar-bits={bits}: only \(2, 3, 4, 8\) bits are supported"):
            check_bits(bits, "--scalar-bits")
    with pytest.raises(QuantNoiseError, match="bits=6: only"):
        ScalarCodes((2, 2), 6)


def test_affine_min_max_per_tensor_by_hand():
    w = torch.tensor([[-1.0, 0.5], [1.9, 3.0]])
    scale, zero_point = affine_params(w, 4)
    assert scale.shape == (1, 1) and zero_point.shape == (1, 1)
    assert float(scale) == pytest.approx(4.0 / 15) and float(zero_point) == 4  # round(1 / (4 / 15)) = round(3.75)
    codes, scale, zero_point = quantize(w, 4)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[0, 6], [11, 15]]  # round(w / scale) + 4: -3.75, 1.875, 7.125, 11.25
    assert torch.equal(dequantize(codes, scale, zero_point), (codes.float() - 4) * (4.0 / 15))


def test_zero_stays_exact_when_every_weight_has_one_sign():
    positive = torch.tensor([[0.5, 1.0, 2.0]])
    scale, zero_point = affine_params(positive, 8)
    assert float(zero_point) == 0 and float(scale) == pytest.approx(2.0 / 255)  # the range is [0, 2], not [0.5, 2]
    negative = -positive
    scale, zero_point = affine_params(negative, 8)
    assert float(zero_point) == 255 and float(scale) == pytest.approx(2.0 / 255)
    assert float(dequantize(*quantize(torch.zeros(1, 3), 8))[0, 0]) == 0.0


def test_per_channel_takes_each_output_rows_own_range():
    w = torch.tensor([[-1.0, 3.0], [0.0, 30.0]])
    scale, zero_point = affine_params(w, 8, per_channel=True)
    assert scale.shape == (2, 1)
    assert scale[:, 0].tolist() == pytest.approx([4.0 / 255, 30.0 / 255])
    assert zero_point[:, 0].tolist() == [64.0, 0.0]  # round(1 / (4 / 255)) = round(63.75)
    scale3, _ = affine_params(torch.zeros(4, 3, 2), 8, per_channel=True)  # a 3-D weight: one scale per leading index
    assert scale3.shape == (4, 1, 1) and float(scale3.min()) == pytest.approx(1e-8)  # all zero: the floor, not 0


@pytest.mark.parametrize("bits, half", [(8, 128), (4, 8), (3, 4), (2, 2)])
def test_symmetric_codes_are_signed_around_half_the_range(bits, half):
    w = torch.tensor([[-2.0, 0.5, 1.0]])
    scale, zero_point = affine_params(w, bits, symmetric=True)
    assert float(zero_point) == half and float(scale) == pytest.approx(2.0 / (half - 1))
    codes, _, _ = quantize(w, bits, symmetric=True)
    assert int(codes[0, 0]) == 1  # -2 is -(half - 1) steps: the lowest signed code, never 0
    assert torch.equal(codes.float() - half, torch.round(w / scale).clamp(-(half - 1), half - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantize_is_quantize_then_dequantize(bits, per_channel):
    torch.manual_seed(bits)
    w = torch.randn(16, 12) * 2
    expected = dequantize(*quantize(w, bits, per_channel))
    out = fake_quantize(w, bits, per_channel)
    assert torch.allclose(out, expected, atol=1e-6) and out.dtype == w.dtype
    half = fake_quantize(w.half(), bits, per_channel)  # computed in fp32 from the fp16 weight, returned in fp16
    assert half.dtype == torch.float16
    assert torch.equal(half, dequantize(*quantize(w.half().float(), bits, per_channel)).half())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_codes_round_trip_through_their_packed_form(bits, per_channel):
    torch.manual_seed(0)
    w = torch.randn(10, 7)  # 70 codes: 3-bit ones end mid-byte
    codes = ScalarCodes(w.shape, bits, per_channel=per_channel).fit(w)
    assert codes.scale.shape == ((10, 1) if per_channel else (1, 1)) and int(codes.n_bits) == bits
    state = codes.packed_state()
    if bits == 8:
        assert "codes_packed" not in state and state["codes"] is codes.codes
    else:
        assert "codes" not in state and state["codes_packed"].numel() == (70 * bits + 7) // 8
    fresh = ScalarCodes(w.shape, bits, per_channel=per_channel)
    fresh.load_state_dict(dict(state))
    assert torch.equal(fresh.codes, codes.codes) and torch.equal(fresh(), codes())
    assert torch.equal(codes(), dequantize(*quantize(w, bits, per_channel)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_an_all_zero_weight_gets_the_smallest_scale_and_decodes_to_zero(symmetric):
    w = torch.zeros(3, 4)
    codes, scale, zero_point = quantize(w, 8, per_channel=True, symmetric=symmetric)
    assert torch.equal(scale, torch.full((3, 1), 1e-8)) and torch.equal(dequantize(codes, scale, zero_point), w)


def test_codes_set_elsewhere_are_kept_as_given():
    codes = ScalarCodes((2, 3), 4)
    given = torch.tensor([[0, 15, 7], [1, 2, 3]], dtype=torch.uint8)
    codes.set_codes(given, torch.tensor([[0.5], [2.0]]), torch.tensor([[7.0], [0.0]]))
    assert codes().tolist() == [[-3.5, 4.0, 0.0], [2.0, 4.0, 6.0]]
    assert codes.extra_repr() == "shape=(2, 3), bits=4, per_channel=True"


def test_a_weight_at_both_rounding_ties_is_clamped_to_the_top_code():
    """lo / scale = -3.5 and hi / scale = 11.5: the zero point rounds to 4 and hi to 12, one past int4's 15."""
    w = torch.tensor([[-0.875, 2.875, 0.0]])
    codes, scale, zero_point = quantize(w, 4)
    assert float(scale) == 0.25 and float(zero_point) == 4
    assert codes.tolist() == [[0, 15, 4]]
    assert fake_quantize(w, 4).tolist() == [[-1.0, 2.75, 0.0]]  # (codes - 4) * 0.25
    assert torch.equal(fake_quantize(w, 4), fake_quantize(w, 4, per_channel=False))  # per tensor unless asked
    two_rows = torch.tensor([[-1.0, 1.0], [0.0, 8.0]])
    assert not torch.equal(fake_quantize(two_rows, 2), fake_quantize(two_rows, 2, per_channel=True))
