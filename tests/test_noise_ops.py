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
        (QuantNoiseConfig(scalar=0.5, scalar_bits=5), "--quant-noise-scalar-bits=5"),
        (QuantNoiseConfig(pq=0.1, pq_block_size=5), "layer 0 (weight shape (50, 16))"),
    ],
)
def test_bad_noise_settings_are_one_line_errors_naming_the_culprit(cfg, message):
    with pytest.raises(ValueError) as err:
        apply_quant_noise_(_model(), cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def _tied_model():
    emb = nn.Embedding(64, 16)
    out = nn.Linear(16, 64, bias=False)
    out.weight = emb.weight  # the tied output softmax
    return nn.ModuleDict({"emb": emb, "fc": nn.Linear(16, 16), "out": out})


def _dropped_fraction(module, x, block_size=4):
    """Fraction of weight blocks the module computed with as zero (what PQ noise drops)."""
    seen = {}

    def record(m, args):
        seen["w"] = m.weight.detach().clone()

    handle = module.register_forward_pre_hook(record)
    module(x)
    handle.remove()
    return (seen["w"].reshape(-1, block_size) == 0).all(dim=1).float().mean().item()


def test_embedding_rate_applies_to_embedding_tables_and_the_softmax_tied_to_them():
    torch.manual_seed(0)
    model = _tied_model()
    nn.init.uniform_(model["emb"].weight, 0.5, 1.0)  # no zero weights: zeros mean dropped
    nn.init.uniform_(model["fc"].weight, 0.5, 1.0)
    names = apply_quant_noise_(model, QuantNoiseConfig(pq=0.5, pq_block_size=4, pq_embeddings=0.1))
    assert names == ["emb", "fc", "out"]
    ids, features = torch.arange(64), torch.randn(8, 16)
    assert abs(_dropped_fraction(model["emb"], ids) - 0.1) < 0.05
    assert abs(_dropped_fraction(model["out"], features) - 0.1) < 0.05  # same weight, same rate
    assert abs(_dropped_fraction(model["fc"], features) - 0.5) < 0.15

    only_linear = _tied_model()
    assert apply_quant_noise_(only_linear, QuantNoiseConfig(pq=0.5, pq_block_size=4, pq_embeddings=0.0)) == ["fc"]
    only_embeddings = _tied_model()
    assert apply_quant_noise_(only_embeddings, QuantNoiseConfig(pq=0.0, pq_block_size=4, pq_embeddings=0.3)) == ["emb", "out"]


def test_noise_starts_at_its_update_and_ramps_up_linearly():
    torch.manual_seed(0)
    layer = nn.Linear(64, 256)
    nn.init.uniform_(layer.weight, 0.5, 1.0)
    apply_quant_noise_(layer, QuantNoiseConfig(pq=0.4, pq_block_size=4, start_update=100, ramp_updates=4))
    x = torch.randn(2, 64)
    expected = {0: 0.0, 99: 0.0, 100: 0.1, 101: 0.2, 103: 0.4, 500: 0.4}
    for update, rate in expected.items():
        layer.set_num_updates(update)  # what fairseq's model.set_num_updates calls on every submodule
        assert abs(_dropped_fraction(layer, x) - rate) < 0.03, (update, rate)
    assert QuantNoiseConfig(pq=0.1, start_update=5).rate_scale(4) == 0 and QuantNoiseConfig(pq=0.1, start_update=5).rate_scale(5) == 1


def test_centroid_noise_replaces_a_fraction_p_of_blocks_by_their_nearest_centroid_straight_through():
    from quant_noise_plugin.kmeans import assign
    from quant_noise_plugin.noise import centroid_noise

    torch.manual_seed(0)
    w = torch.randn(128, 32, requires_grad=True)
    centroids = torch.randn(16, 4)
    out = centroid_noise(w, 0.3, centroids)
    blocks, noised = w.detach().reshape(-1, 4), out.detach().reshape(-1, 4)
    changed = (blocks != noised).any(dim=1)
    assert abs(changed.float().mean().item() - 0.3) < 0.05
    nearest, _ = assign(blocks[changed], centroids)
    assert torch.allclose(noised[changed], centroids[nearest], atol=1e-6)  # the real PQ value of each replaced block
    assert torch.equal(noised[~changed], blocks[~changed])  # the rest untouched, no rescaling
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_centroid_noise_refits_its_codebook_every_interval_and_shares_it_between_tied_layers():
    torch.manual_seed(0)
    model = _tied_model()
    apply_quant_noise_(model, QuantNoiseConfig(pq=0.5, pq_block_size=4, pq_centroids=8, pq_refit_updates=10))
    fits = []
    import quant_noise_plugin.quant_noise as qn

    real = qn.kmeans
    qn.kmeans = lambda points, k, **kw: fits.append(points.shape) or real(points, k, **kw)
    try:
        for update in (0, 5, 9, 10, 25):
            model["emb"].set_num_updates(update)
            model["emb"](torch.arange(8))
            model["out"](torch.randn(2, 16))
    finally:
        qn.kmeans = real
    # the tied weight: fitted at 0, 10 and 25 (not again for the second, tied layer); fc never ran
    assert fits == [(64 * 16 // 4, 4)] * 3
    with pytest.raises(ValueError, match="--quant-noise-pq-centroids=512: layer emb .* has only 256 blocks"):
        apply_quant_noise_(_tied_model(), QuantNoiseConfig(pq=0.1, pq_block_size=4, pq_centroids=512))


def test_fused_noise_is_the_reference_noise_for_the_same_generator_state():
    """The compiled (fused) forms draw the same random numbers and compute the same values and gradients."""
    w = torch.randn(96, 64, requires_grad=True)
    fused = pq_noise(w, 0.2, 8, torch.Generator().manual_seed(7), fused=True)
    reference = pq_noise(w, 0.2, 8, torch.Generator().manual_seed(7), fused=False)
    assert torch.equal(fused, reference)
    (grad_fused,) = torch.autograd.grad(fused.sum(), w)
    (grad_reference,) = torch.autograd.grad(reference.sum(), w)
    assert torch.equal(grad_fused, grad_reference)  # dropped blocks get no gradient in both
    for p, bits, per_channel in ((0.5, 4, False), (0.5, 8, True), (1.0, 4, True)):
        fused = scalar_noise(w, p, bits, per_channel, torch.Generator().manual_seed(3), fused=True)
        reference = scalar_noise(w, p, bits, per_channel, torch.Generator().manual_seed(3), fused=False)
        assert torch.equal(fused, reference), (p, bits, per_channel)
        (grad,) = torch.autograd.grad(fused.sum(), w)
        assert torch.equal(grad, torch.ones_like(w))  # straight-through


def test_centroid_noise_takes_each_layers_block_size_and_k_from_a_schedule(tmp_path):
    """--quant-noise-pq-schedule: the noise of the compression each layer will get; layers the schedule leaves out get none."""
    import quant_noise_plugin.quant_noise as qn
    from test_schedule import TinyLM

    schedule = tmp_path / "plan.yaml"
    schedule.write_text("defaults:\n  Linear: {block_size: 4, n_centroids: 8}\nstages:\n"
                        "  - name: ffn\n    layers: 'decoder\\.layers\\.\\d+\\.fc1'\n    updates: 1\n"
                        "    per_layer:\n      - {layers: 'decoder\\.layers\\.1\\.fc1', block_size: 8, n_centroids: 4}\n")
    torch.manual_seed(0)
    model = TinyLM()
    apply_quant_noise_(model, QuantNoiseConfig(pq=0.5, pq_schedule=str(schedule)))
    fits = []
    real = qn.kmeans
    qn.kmeans = lambda points, k, **kw: fits.append((tuple(points.shape), k)) or real(points, k, **kw)
    layers = model.decoder.layers
    try:
        model.train()
        x = torch.randn(3, 16)
        for layer in layers:
            layer.fc1(x)
    finally:
        qn.kmeans = real
    assert fits == [((32 * 16 // 4, 4), 8), ((32 * 16 // 8, 8), 4)]  # layer 0: the stage's 4 x 8; layer 1: its own 8 x 4
    y = torch.randn(3, 32)
    assert torch.equal(layers[0].fc2(y), torch.nn.functional.linear(y, layers[0].fc2.weight, layers[0].fc2.bias))  # left out: no noise
    with pytest.raises(ValueError, match="--quant-noise-pq-schedule .* and --quant-noise-pq-centroids=16: give one"):
        apply_quant_noise_(TinyLM(), QuantNoiseConfig(pq=0.5, pq_schedule=str(schedule), pq_centroids=16))
