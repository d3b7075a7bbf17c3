"""Quant-Noise operators and their attachment, in plain torch (no fairseq)."""
import pytest
import torch
from torch import nn

from quant_noise_plugin.noise import pq_noise, scalar_noise
from quant_noise_plugin.quant_noise import QuantNoiseConfig, apply_quant_noise_
from quant_noise_plugin.scalar import dequantize, fake_quantize, quantize


def test_pq_noise_drops_fraction_p_of_blocks_and_rescales_the_rest():
    torch.manual_seed(0)
    w = torch.randn(256, 64).abs() + 0.1  # no zero weights, so zeros mean dropped
    noised = pq_noise(w, 0.3, 8)
    blocks = noised.reshape(256, 8, 8)
    dropped = (blocks == 0).all(dim=-1)
    kept_equal = torch.allclose(blocks[~dropped], (w.reshape(256, 8, 8) / 0.7)[~dropped])
    assert kept_equal
    assert ((blocks == 0).any(dim=-1) == dropped).all()  # whole blocks only
    assert abs(dropped.float().mean().item() - 0.3) < 0.03


def test_pq_noise_is_unbiased():
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    mean = torch.stack([pq_noise(w, 0.5, 4) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, w, atol=0.1 * w.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_scalar_round_trip_error_is_within_half_a_step(bits, per_channel):
    torch.manual_seed(0)
    w = torch.randn(64, 32) * 3
    codes, scale, zero_point = quantize(w, bits, per_channel)
    assert int(codes.max()) <= 2**bits - 1
    err = (dequantize(codes, scale, zero_point) - w).abs()
    assert (err <= scale / 2 + 1e-6).all()
    assert len(torch.unique(fake_quantize(w, bits, per_channel)[0])) <= 2**bits


def test_scalar_noise_quantizes_fraction_p_with_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(128, 128, requires_grad=True)
    out = scalar_noise(w, 0.25, 4)
    changed = (out != w).float().mean().item()
    assert 0.2 < changed < 0.3
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    full = scalar_noise(w.detach(), 1.0, 8)
    assert torch.equal(full, fake_quantize(w.detach(), 8))


class MyLinear(nn.Linear):
    """A user subclass of Linear: must be noised like Linear (the reference raises KeyError)."""


def _model():
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), MyLinear(32, 16))


def test_weights_never_change_outside_optimizer_steps_and_gradients_reach_them():
    torch.manual_seed(0)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_quant_noise_(model, QuantNoiseConfig(pq=0.5, pq_block_size=4, scalar=0.5, scalar_bits=4))
    x = torch.randint(0, 50, (8, 5))
    for _ in range(50):  # like --update-freq 50 without an optimizer step
        model(x).sum().backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_every_noised_layer_sees_noise_in_train_and_none_in_eval():
    torch.manual_seed(0)
    model = _model()
    names = apply_quant_noise_(model, QuantNoiseConfig(pq=0.5, pq_block_size=4))
    assert names == ["0", "1", "3"]
    seen = {}

    def record(module, args):
        seen[module] = module.weight is not module._parameters["weight"] and (module.weight == 0).any().item()

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.register_forward_pre_hook(record)
    model(torch.randint(0, 50, (4, 3)))
    assert len(seen) == 3 and all(seen.values())
    model.eval()
    seen.clear()
    model(torch.randint(0, 50, (4, 3)))
    assert len(seen) == 3 and not any(seen.values())


def test_tied_weights_stay_tied():
    emb = nn.Embedding(20, 8)
    out = nn.Linear(8, 20, bias=False)
    out.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "out": out})
    apply_quant_noise_(model, QuantNoiseConfig(pq=0.2, pq_block_size=4))
    assert model["out"].weight is model["emb"].weight
    assert len(list(model.parameters())) == 1


@pytest.mark.parametrize(
    "cfg, message",
    [
        (QuantNoiseConfig(pq=1.0), "--quant-noise-pq=1.0"),
        (QuantNoiseConfig(pq=-0.1), "--quant-noise-pq=-0.1"),
        (QuantNoiseConfig(scalar=1.5), "--quant-noise-scalar=1.5"),
        (QuantNoiseConfig(scalar=0.5, scalar_bits=3), "--quant-noise-scalar-bits=3"),
        (QuantNoiseConfig(pq=0.1, pq_block_size=5), "layer 0 (weight shape (50, 16))"),
    ],
)
def test_bad_noise_settings_are_one_line_errors_naming_the_culprit(cfg, message):
    with pytest.raises(ValueError) as err:
        apply_quant_noise_(_model(), cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
