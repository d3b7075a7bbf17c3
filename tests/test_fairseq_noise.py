"""Quant-Noise on real fairseq models, built in-process from the plugin's registrations."""
import pytest
import torch
from torch import nn

import quant_noise_plugin  # noqa: F401  (registers)
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import PLUGIN, TINY_LM


def build(data, *argv, criterion=False):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--user-dir", PLUGIN, "--task", "language_modeling",
                                                "--tokens-per-sample", "16", "--cpu", *argv])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return (model, task.build_criterion(cfg.criterion), cfg) if criterion else model


def batch(n=4, length=16, vocab=100):
    tokens = torch.randint(4, vocab, (n, length))
    return {"net_input": {"src_tokens": tokens, "src_lengths": torch.full((n,), length)}, "target": tokens,
            "ntokens": n * length, "nsentences": n}


def noised_modules(model, run):
    """Names of layers whose weight, as the computation reads it, is not their Parameter and has zero blocks.

    Linear/Embedding layers are checked when called; attention projections when their attention
    module runs, since fairseq's fused attention reads ``q_proj.weight`` without calling q_proj.
    """
    seen = {}
    handles = []

    def check(name, module):
        w = module.weight
        seen[name] = (w is not module._parameters["weight"]) and bool((w == 0).any())

    for name, m in model.named_modules():
        if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
            def attention_hook(module, args, name=name):
                for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    check(f"{name}.{p}", getattr(module, p))
            handles.append(m.register_forward_pre_hook(attention_hook))
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            handles.append(m.register_forward_pre_hook(lambda module, args, name=name: check(name, module)))
    run()
    for h in handles:
        h.remove()
    return seen


def test_qn_arch_noises_every_layer_including_attention_projections(lm_data):
    torch.manual_seed(0)
    model = build(lm_data, "--arch", "qn_transformer_lm", *TINY_LM, "--quant-noise-pq", "0.3", "--quant-noise-pq-block-size", "8")
    model.train()
    seen = noised_modules(model, lambda: model(batch()["net_input"]["src_tokens"]))
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
        assert seen[f"decoder.layers.0.{suffix}"], suffix
    assert seen["decoder.embed_tokens"] and seen["decoder.output_projection"]
    assert not model.decoder.layers[0].self_attn.skip_embed_dim_check  # fairseq's fused attention path stays in use
    model.eval()
    seen = noised_modules(model, lambda: model(batch()["net_input"]["src_tokens"]))
    assert seen and not any(seen.values())


def test_qn_arch_is_transformer_lm_when_noise_is_off(lm_data):
    ours = build(lm_data, "--arch", "qn_transformer_lm", *TINY_LM, "--quant-noise-pq", "0.1")
    stock = build(lm_data, "--arch", "transformer_lm", *TINY_LM, "--decoder-input-dim", "64", "--decoder-output-dim", "64")
    assert sorted(ours.state_dict()) == sorted(stock.state_dict())  # no extra quant_noise Linear
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    stock.load_state_dict(ours.state_dict())  # a checkpoint loads in either
    ours.eval(), stock.eval()
    tokens = batch()["net_input"]["src_tokens"]
    assert torch.allclose(ours(tokens)[0], stock(tokens)[0], atol=1e-5)


def test_criterion_noises_a_fairseq_arch_once_and_removes_fairseq_builtin_noise(lm_data):
    torch.manual_seed(0)
    model, criterion, cfg = build(lm_data, "--arch", "transformer_lm", *TINY_LM, "--decoder-input-dim", "64", "--decoder-output-dim", "64",
                                  "--criterion", "qn_cross_entropy", "--quant-noise-pq", "0.3", "--quant-noise-scalar", "0.1", criterion=True)
    # The flag fed the criterion, not fairseq's transformer_lm: no extra Linear, no fairseq hooks.
    assert cfg.model.quant_noise_pq == 0 and cfg.criterion.qn_pq == 0.3
    assert not hasattr(model.decoder, "quant_noise") or model.decoder.quant_noise is None
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = batch()
    criterion(model, sample)[0].backward()  # the first training forward attaches the noise
    seen = noised_modules(model, lambda: criterion(model, sample)[0].backward())
    assert seen["decoder.layers.1.self_attn.v_proj"] and seen["decoder.layers.0.fc2"]
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values() if getattr(h, "__module__", "") == "fairseq.modules.quant_noise"]
    assert hooks == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fairseq_builtin_noise_is_undone_when_present(lm_data):
    """fairseq's own in-place pre-hooks (REFERENCE_NOTES 1) are removed by apply_quant_noise_."""
    from fairseq.modules.quant_noise import quant_noise

    from quant_noise_plugin.quant_noise import QuantNoiseConfig, apply_quant_noise_

    layer = quant_noise(nn.Linear(16, 16), 0.5, 8)
    w = layer.weight.detach().clone()
    apply_quant_noise_(layer, QuantNoiseConfig(pq=0.5, pq_block_size=8))
    for _ in range(5):
        layer(torch.randn(2, 16))
    assert torch.equal(layer.weight, w)


def test_bad_flags_fail_before_training(lm_data):
    with pytest.raises(ValueError, match=r"--quant-noise-pq-block-size=5 does not divide the input dimension of layer decoder\.embed_tokens"):
        build(lm_data, "--arch", "qn_transformer_lm", *TINY_LM, "--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "5")
    with pytest.raises(ValueError, match="--quant-noise-scalar-bits=5"):
        build(lm_data, "--arch", "qn_transformer_lm", *TINY_LM, "--quant-noise-scalar", "0.1", "--quant-noise-scalar-bits", "5")


@pytest.mark.parametrize("via", ["arch", "criterion"])
def test_fairseq_update_count_drives_the_noise_schedule(lm_data, via):
    """fairseq calls model.set_num_updates(n) before each training forward; the noise starts at its update."""
    torch.manual_seed(0)
    flags = ["--quant-noise-pq", "0.3", "--quant-noise-start-update", "5"]
    if via == "arch":
        model = build(lm_data, "--arch", "qn_transformer_lm", *TINY_LM, *flags)
        forward = lambda: model(batch()["net_input"]["src_tokens"])  # noqa: E731
    else:
        model, criterion, _ = build(lm_data, "--arch", "transformer_lm", *TINY_LM, "--decoder-input-dim", "64", "--decoder-output-dim", "64",
                                    "--criterion", "qn_cross_entropy", *flags, criterion=True)
        forward = lambda: criterion(model, batch())  # noqa: E731
    model.train()
    model.set_num_updates(4)
    assert not any(noised_modules(model, forward).values())
    model.set_num_updates(5)
    seen = noised_modules(model, forward)
    assert seen["decoder.layers.0.fc1"] and seen["decoder.layers.1.self_attn.k_proj"] and seen["decoder.embed_tokens"]
