"""Layers shared by chunks (``--decoder-share-layer-chunk``): one weight per chunk, stored and counted once, through the
noise, iPQ (one codebook per shared weight, calibration summed over every use), packing, codes-mode inference, unpack,
pruning and fairseq's multi-process training."""
import os

import pytest
import torch
from torch import nn

from conftest import PLUGIN, SCHEDULE as TWO_STAGES, TINY_LM, eval_lm_ppl, run, train_lm
from quant_noise_plugin.calibration import collect_input_moments
from quant_noise_plugin.checkpoints import CheckpointError
from quant_noise_plugin.compressed import attach_pq_plan, fit_pq
from quant_noise_plugin.errors import QuantNoiseError
from quant_noise_plugin.packing import pack_state_dict, predicted_file
from quant_noise_plugin.pruning import parse_keep, prune_checkpoint
from quant_noise_plugin.quant_noise import QuantNoiseConfig, apply_quant_noise_, noise_targets
from quant_noise_plugin.schedule import plan_schedule, schedule_from_dict
from quant_noise_plugin.sharing import check_shared_keys_agree, share_stacks_, shared_chunks
from quant_noise_plugin.integrity import pop_and_verify, with_checksums
from quant_noise_plugin.sizes import dense_fp32_bytes, pq_bytes, serialized_bytes, size_rows
from quant_noise_plugin.weight_swap import weight_fns

SHARED = ["--decoder-layers", "4", *TINY_LM[2:], "--decoder-share-layer-chunk", "2"]  # the tiny LM, 4 layers in 2 chunks


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """A decoder-shaped toy: ``decoder.layers.<i>.fc1`` etc."""

    def __init__(self, depth=4, width=16):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.decoder.layers:
            x = layer(x)
        return x


def shared_stack(chunk=2, depth=4):
    torch.manual_seed(0)
    model = Stack(depth)
    share_stacks_(model, {"decoder": chunk})
    return model


def test_chunks_share_one_module_and_bad_chunks_are_one_line_errors():
    model = shared_stack()
    layers = model.decoder.layers
    assert layers[1] is layers[0] and layers[3] is layers[2] and layers[2] is not layers[0]
    assert shared_chunks(layers) == [(0, 1), (2, 3)]
    assert sum(p.numel() for p in model.parameters()) == 2 * sum(p.numel() for p in Block().parameters())
    assert list(model.state_dict()) == list(Stack().state_dict())  # every layer's keys: unshared models load it
    with pytest.raises(QuantNoiseError, match=r"^--decoder-share-layer-chunk 3 does not divide the 4 decoder layers"):
        share_stacks_(Stack(), {"decoder": 3})
    with pytest.raises(QuantNoiseError, match=r"^--decoder-share-layer-chunk 0: must be >= 1"):
        share_stacks_(Stack(), {"decoder": 0})
    with pytest.raises(QuantNoiseError, match=r"^--encoder-share-layer-chunk 2: this model has no encoder layer stack"):
        share_stacks_(Stack(), {"encoder": 2})


def test_noise_hooks_a_shared_layer_once():
    model = shared_stack()
    apply_quant_noise_(model, QuantNoiseConfig(pq=0.5, pq_block_size=4))
    assert noise_targets(model, QuantNoiseConfig(pq=0.5, pq_block_size=4)) == [
        "decoder.layers.0.fc1", "decoder.layers.0.fc2", "decoder.layers.2.fc1", "decoder.layers.2.fc2"]
    assert len(weight_fns(model.decoder.layers[1].fc1)) == 1
    model(torch.randn(3, 16)).sum().backward()  # both uses' gradients reach the one weight
    assert model.decoder.layers[0].fc1.weight.grad is not None


TOY_SCHEDULE = {"defaults": {"Linear": {"block_size": 4, "n_centroids": 8}}, "kmeans_iterations": 4,
            "stages": [{"name": "ffn", "layers": r"decoder\.layers\.\d+\.fc[12]", "updates": 1}]}


def quantized_stack():
    model = shared_stack()
    plans = plan_schedule(schedule_from_dict(TOY_SCHEDULE), model)[0].layers
    for plan in plans:
        attach_pq_plan(model, plan)
        fit_pq(model, plan, n_iter=4, seed=0)
    return model, plans


def test_ipq_fits_one_codebook_per_shared_weight_and_counts_its_bytes_once():
    model, plans = quantized_stack()
    assert [p.names for p in plans] == [["decoder.layers.0.fc1", "decoder.layers.1.fc1"], ["decoder.layers.0.fc2", "decoder.layers.1.fc2"],
                                        ["decoder.layers.2.fc1", "decoder.layers.3.fc1"], ["decoder.layers.2.fc2", "decoder.layers.3.fc2"]]
    assert len(weight_fns(model.decoder.layers[1].fc1)) == 1  # attached once, though named twice
    rows = size_rows(model)
    pq = [r for r in rows if r.method == "pq"]
    # two chunks, two weights each: 4 codebooks of 32x16 weights in blocks of 4, K=8 (3-bit codes); biases fp16 once
    assert [r.name for r in pq] == ["decoder.layers.0.fc1", "decoder.layers.0.fc2", "decoder.layers.2.fc1", "decoder.layers.2.fc2"]
    assert sum(r.bytes for r in pq) == 4 * pq_bytes((32, 16), 4, 8) == 4 * (48 + 64 + 1)
    assert sum(r.bytes for r in rows if r.method == "fp16") == 2 * 2 * (32 + 16)
    assert dense_fp32_bytes(model) == 4 * 2 * (2 * 32 * 16 + 32 + 16)
    packed = pack_state_dict(model)
    assert packed["decoder.layers.1.fc1.weight_pq.codes_packed"] is packed["decoder.layers.0.fc1.weight_pq.codes_packed"]
    file = predicted_file(model, {})
    unshared = pack_state_dict(model)
    for key in [k for k in unshared if ".layers.1." in k or ".layers.3." in k]:
        unshared[key] = unshared[key].clone()  # what storing each layer's copy would take
    assert serialized_bytes({"model": with_checksums(unshared)}) > file["predicted_packed_file_bytes"] + 2 * 4 * (48 + 64)


def test_calibration_sums_every_use_of_a_shared_weight_once():
    model = shared_stack()
    x = torch.randn(5, 16)
    moments = collect_input_moments(model, {"decoder.layers.0.fc1": ["decoder.layers.0.fc1", "decoder.layers.1.fc1"]}, [x],
                                     lambda batch: model(batch), full=True)["decoder.layers.0.fc1"]
    assert moments.n_inputs == 2 * 5  # two uses of 5 rows each, not each use counted twice
    first = x
    second = model.decoder.layers[0](x)
    assert torch.allclose(moments.input_sq.float(), (first ** 2).sum(0) + (second ** 2).sum(0), rtol=1e-5)


def test_a_checkpoint_of_an_unshared_model_does_not_load_silently():
    from fairseq.modules import LayerDropModuleList

    model = shared_stack()
    assert check_shared_keys_agree(model, model.state_dict()) is None
    model.decoder.layers = LayerDropModuleList(0.5, list(model.decoder.layers))  # iterating it skips layers at random
    torch.manual_seed(0)
    for _ in range(5):
        assert check_shared_keys_agree(model, model.state_dict()) is None
    assert check_shared_keys_agree(model, Stack().state_dict()) == "decoder.layers.1.fc1.weight"


def test_pruning_a_shared_model_keeps_whole_chunks():
    model = {f"decoder.layers.{i}.fc1.weight": torch.full((2, 2), float(i // 2)) for i in range(4)}
    state = {"model": model, "cfg": {"model": {"decoder_layers": 4, "decoder_share_layer_chunk": 2}}}
    with pytest.raises(CheckpointError, match=r"^--keep 0,2: splits the shared chunks of decoder.layers \(--decoder-share-layer-chunk 2: "
                                              r"layers 0-1 share one set of weights\)"):
        prune_checkpoint(state, parse_keep("0,2"))
    pruned, _, _ = prune_checkpoint(state, parse_keep("2,3"))
    assert pruned["cfg"]["model"]["decoder_layers"] == 2 and pruned["cfg"]["model"]["decoder_share_layer_chunk"] == 2


# --- through fairseq's commands --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_lm(lm_data, tmp_path_factory):
    """Sharing, LayerDrop and Quant-Noise trained together."""
    save = tmp_path_factory.mktemp("shared_lm")
    out = train_lm(lm_data, save, "--arch", "qn_transformer_lm", *SHARED, "--decoder-layerdrop", "0.2", "--quant-noise-pq", "0.1",
                   max_update=20).output
    assert "quant-noise: layers shared by chunks: decoder.layers by 2 (2 weight sets)" in out
    return save / "checkpoint_last.pt"


# conftest's two-stage schedule, every stage on the output objective
OUTPUT_SCHEDULE = TWO_STAGES.replace("    objective: activations\n", "").replace("kmeans_iterations: 10", "kmeans_iterations: 5\nobjective: output")
assert "objective: output" in OUTPUT_SCHEDULE and "activations" not in OUTPUT_SCHEDULE

UNSHARED_PARAMS = 199168 + 4 * 33472  # the tiny LM at 4 layers: tied 3112 x 64 embedding, 33,472 parameters a layer


def test_a_shared_model_trains_compresses_packs_and_loads_everywhere(shared_lm, lm_data, tmp_path):
    state = torch.load(shared_lm, weights_only=False)["model"]
    assert state["decoder.layers.1.fc1.weight"].data_ptr() == state["decoder.layers.0.fc1.weight"].data_ptr()
    size = run(["quant-noise", "size", shared_lm]).output
    assert f"dense fp32 size:                       {4 * (UNSHARED_PARAMS - 2 * 33472) / 1e6:.3f} MB" in size

    schedule = tmp_path / "output.yaml"
    schedule.write_text(OUTPUT_SCHEDULE)
    save = tmp_path / "ipq"
    out = train_lm(lm_data, save, "--task", "ipq_language_modeling", "--ipq-config", schedule, "--finetune-from-model", shared_lm,
                   "--arch", "qn_transformer_lm", *SHARED, "--lr", "0.0005", max_update=6).output
    assert "ipq stage 0 (ffn): updates 0-2, 4 weights: decoder.layers.0.fc1, decoder.layers.0.fc2, decoder.layers.2.fc1, decoder.layers.2.fc2" in out
    ipq = save / "checkpoint_last.pt"
    trained = torch.load(ipq, weights_only=False)["model"]
    assert trained["decoder.layers.3.fc2.weight_pq.codes"].data_ptr() == trained["decoder.layers.2.fc2.weight_pq.codes"].data_ptr()

    packed = tmp_path / "packed.pt"
    line = run(["quant-noise", "pack", ipq, packed]).output
    assert "predicted" in line and "(+0.0%)" in line
    reference = eval_lm_ppl(lm_data, ipq, "--user-dir", PLUGIN)
    assert eval_lm_ppl(lm_data, packed, "--user-dir", PLUGIN) == pytest.approx(reference, rel=1e-3)  # fp16 rest
    codes = eval_lm_ppl(lm_data, packed, "--user-dir", PLUGIN, env={**os.environ, "QUANT_NOISE_INFERENCE": "codes"})
    assert codes == pytest.approx(reference, rel=1e-3)
    unpacked = tmp_path / "unpacked.pt"
    run(["quant-noise", "unpack", packed, unpacked])
    assert eval_lm_ppl(lm_data, unpacked) == pytest.approx(reference, rel=1e-3)  # stock fairseq: the layers expanded

    pruned = tmp_path / "pruned.pt"
    run(["quant-noise", "prune", packed, "--keep", "0,1", "-o", pruned])  # the first chunk, both of its uses
    kept = torch.load(pruned, weights_only=False)
    assert kept["cfg"]["model"]["decoder_layers"] == 2  # a packed file keeps its config as a plain dict
    assert eval_lm_ppl(lm_data, pruned, "--user-dir", PLUGIN) > 0
    bad = run(["quant-noise", "prune", packed, "--keep", "0,2", "-o", pruned], check=False)
    assert bad.returncode != 0 and "--keep 0,2: splits the shared chunks of decoder.layers" in bad.output

    # a shared checkpoint loads into an unshared model of its depth, each layer its own copy: the same model
    expanded = eval_lm_ppl(lm_data, shared_lm, "--user-dir", PLUGIN, "--model-overrides", "{'decoder_share_layer_chunk': 1}")
    assert expanded == eval_lm_ppl(lm_data, shared_lm, "--user-dir", PLUGIN)
    tampered = tmp_path / "tampered.pt"
    full = torch.load(shared_lm, weights_only=False)
    pop_and_verify(full["model"], "the checkpoint")
    full["model"]["decoder.layers.1.fc1.weight"] = full["model"]["decoder.layers.1.fc1.weight"].clone() + 1
    full["model"] = with_checksums(full["model"])  # a checkpoint whose layers differ: not a corrupted one
    torch.save(full, tampered)
    refused = run(["fairseq-eval-lm", lm_data, "--path", tampered, "--user-dir", PLUGIN, "--cpu", "--tokens-per-sample", "64"], check=False)
    assert refused.returncode != 0 and "checkpoint key decoder.layers.1.fc1.weight differs from the layer it shares weights with" in refused.output


@pytest.mark.parametrize("argv, stacks", [
    (["--task", "masked_lm", "--arch", "qn_roberta_tiny", "--criterion", "masked_lm", "--encoder-layers", "4",
      "--encoder-share-layer-chunk", "2"], {"encoder.sentence_encoder.layers": [(0, 1), (2, 3)]}),
    (["--task", "translation", "--arch", "qn_transformer", "--encoder-layers", "2", "--decoder-layers", "3", "--encoder-embed-dim", "32",
      "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--share-all-embeddings",
      "--encoder-share-layer-chunk", "2", "--decoder-share-layer-chunk", "3"],
     {"encoder.layers": [(0, 1)], "decoder.layers": [(0, 1, 2)]}),
], ids=["qn_roberta", "qn_transformer"])
def test_roberta_and_translation_models_share_their_stacks(tiny_data, argv, stacks):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from quant_noise_plugin.sharing import module_stacks

    data = tiny_data / ("lm" if "masked_lm" in argv else "mt") / "bin"
    args = options.parse_args_and_arch(options.get_training_parser(), [str(data), "--user-dir", PLUGIN, "--cpu", *argv])
    cfg = convert_namespace_to_omegaconf(args)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert {name: shared_chunks(layers) for name, layers in module_stacks(model).items()} == stacks
    model.load_state_dict(model.state_dict())  # its own checkpoint loads back


DISTRIBUTED = ["--distributed-world-size", "2", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


def test_a_shared_model_on_2_processes(shared_lm, lm_data, tmp_path):
    from test_distributed_cli import assert_replicas_identical, fairseq_train

    schedule = tmp_path / "output.yaml"
    schedule.write_text(OUTPUT_SCHEDULE)
    fairseq_train(tmp_path, lm_data, tmp_path / "two", "--task", "ipq_language_modeling", "--ipq-config", schedule,
                  "--finetune-from-model", shared_lm, "--arch", "qn_transformer_lm", *SHARED, "--lr", "0.0005",
                  "--quant-noise-pq", "0.1", max_update=6)
    final = assert_replicas_identical(tmp_path / "two", 6)
    assert bool(final["decoder.layers.1.self_attn.q_proj.weight_pq.fitted"])
    assert torch.equal(final["decoder.layers.1.fc1.weight_pq.centroids"], final["decoder.layers.0.fc1.weight_pq.centroids"])
