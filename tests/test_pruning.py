"""Pruning after LayerDrop (`quant-noise prune`): a checkpoint of the new depth that fairseq's commands and the hub load
with no override, dense or packed, and one-line errors for a bad --keep."""
import sys

import pytest
import torch

from conftest import PLUGIN, TINY_LM, eval_lm_ppl, run, train_lm
from quant_noise_plugin.checkpoints import CheckpointError
from quant_noise_plugin.pruning import layer_stacks, parse_keep, prune_checkpoint

FOUR_LAYERS = [*TINY_LM[:1], "4", *TINY_LM[2:]]  # the tiny LM, 4 layers deep


@pytest.fixture(scope="module")
def layerdrop_lm(lm_data, tmp_path_factory):
    """Quant-Noise and LayerDrop trained together."""
    save = tmp_path_factory.mktemp("layerdrop")
    train_lm(lm_data, save, "--arch", "qn_transformer_lm", *FOUR_LAYERS, "--decoder-layerdrop", "0.5", "--quant-noise-pq", "0.1",
             max_update=8)
    return save / "checkpoint_last.pt"


HUB = """
import sys
from fairseq.models.transformer_lm import TransformerLanguageModel
hub = TransformerLanguageModel.from_pretrained(sys.argv[1], sys.argv[2], data_name_or_path=sys.argv[3], user_dir=sys.argv[4])
print("hub layers", len(hub.models[0].decoder.layers))
"""


def test_a_pruned_checkpoint_dense_or_packed_loads_everywhere_with_no_override(layerdrop_lm, lm_data, tmp_path):
    pruned = tmp_path / "pruned.pt"
    out = run(["quant-noise", "prune", layerdrop_lm, "--keep", "0,2", "-o", pruned]).output
    assert "decoder.layers 0,2 of 4 kept, renumbered 0-1" in out
    state = torch.load(pruned, weights_only=False)
    model_cfg = vars(state["cfg"]["model"])  # a legacy arch: an argparse.Namespace
    assert model_cfg["decoder_layers"] == 2 and model_cfg.get("decoder_layers_to_keep") is None
    assert layer_stacks(state["model"]) == {"decoder.": 2}
    original = torch.load(layerdrop_lm, weights_only=False)["model"]
    assert torch.equal(state["model"]["decoder.layers.1.fc1.weight"], original["decoder.layers.2.fc1.weight"])
    # the same numbers as fairseq's own load-time pruning, which every command would have to repeat
    kept_at_load = eval_lm_ppl(lm_data, layerdrop_lm, "--user-dir", PLUGIN, "--model-overrides", "{'decoder_layers_to_keep': '0,2'}")
    assert eval_lm_ppl(lm_data, pruned, "--user-dir", PLUGIN) == kept_at_load
    assert "hub layers 2" in run([sys.executable, "-c", HUB, tmp_path, pruned.name, lm_data, PLUGIN]).output

    # packed then pruned = pruned then packed: the same tensors, its checksums and config CRC made anew
    packed, packed_then_pruned, pruned_then_packed = tmp_path / "packed.pt", tmp_path / "pp.pt", tmp_path / "pq.pt"
    run(["quant-noise", "pack", layerdrop_lm, packed, "--scalar-bits", "8"])
    run(["quant-noise", "prune", packed, "--keep", "0,2", "-o", packed_then_pruned])
    run(["quant-noise", "pack", pruned, pruned_then_packed, "--scalar-bits", "8"])
    a, b = (torch.load(p, weights_only=False) for p in (packed_then_pruned, pruned_then_packed))
    assert a["quant_noise"]["pruned"] == {"stack": "decoder", "kept": [0, 2], "of": 4}
    assert set(a["model"]) == set(b["model"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if "checksum" not in k)
    assert eval_lm_ppl(lm_data, packed_then_pruned, "--user-dir", PLUGIN) == pytest.approx(kept_at_load, rel=0.01)  # int8 weights
    assert packed_then_pruned.stat().st_size < 0.8 * packed.stat().st_size


def _state(stacks=("decoder.",), depth=4):
    model = {f"{s}layers.{i}.fc1.weight": torch.full((2, 2), float(i)) for s in stacks for i in range(depth)}
    model["decoder.embed_tokens.weight"] = torch.zeros(3, 2)
    cfg = {"model": {f"{s.split('.')[0]}_layers": depth for s in stacks}}
    return {"model": model, "cfg": cfg, "last_optimizer_state": {"x": 1}}


@pytest.mark.parametrize("keep, message", [
    ("0,4", "--keep 0,4: layer 4 is out of range: decoder.layers has 4 (0 to 3)"),
    ("2,0", "--keep 2,0: give each layer once, in increasing order"),
    ("1,1", "--keep 1,1: give each layer once, in increasing order"),
    ("-1", "--keep -1: layer -1 is out of range"),
])
def test_a_bad_keep_is_one_line_naming_it(keep, message):
    with pytest.raises(CheckpointError) as err:
        prune_checkpoint(_state(), parse_keep(keep))
    assert str(err.value) == message or str(err.value).startswith(message)
    with pytest.raises(CheckpointError, match="--keep: no layer given"):
        parse_keep(" , ")
    with pytest.raises(CheckpointError, match="--keep '0;2': layer indices separated by commas"):
        parse_keep("0;2")


def test_renumbering_config_and_the_stacks_to_choose_from():
    state = _state()
    pruned, stack, depth = prune_checkpoint(state, [1, 3])
    assert (stack, depth) == ("decoder.", 4) and "last_optimizer_state" not in pruned
    assert {k: float(v[0, 0]) for k, v in pruned["model"].items() if "layers" in k} == {"decoder.layers.0.fc1.weight": 1.0,
                                                                                        "decoder.layers.1.fc1.weight": 3.0}
    assert pruned["cfg"]["model"] == {"decoder_layers": 2, "decoder_layers_to_keep": None}
    assert state["cfg"]["model"] == {"decoder_layers": 4}  # the input is left as it was
    two = _state(stacks=("encoder.", "decoder."))
    with pytest.raises(CheckpointError, match="stacks encoder.layers, decoder.layers: name one with --stack, e.g. --stack encoder"):
        prune_checkpoint(two, [0])
    pruned, _, _ = prune_checkpoint(two, [0, 1], stack="encoder")
    assert layer_stacks(pruned["model"]) == {"encoder.": 2, "decoder.": 4}
    assert pruned["cfg"]["model"]["encoder_layers"] == 2 and pruned["cfg"]["model"]["decoder_layers"] == 4
    with pytest.raises(CheckpointError, match="--stack vision: the checkpoint has no vision.layers"):
        prune_checkpoint(two, [0], stack="vision")
    with pytest.raises(CheckpointError, match=r"^the checkpoint: no layer stack \(no <stack>\.layers\.<i>\. keys\) to prune$"):
        prune_checkpoint({"model": {"w": torch.zeros(1)}, "cfg": {"model": {}}}, [0])
    with pytest.raises(CheckpointError, match="its model config has no decoder_layers to set"):
        prune_checkpoint({**_state(), "cfg": {"model": {}}}, [0])
    mid_ipq = {**_state(), "task_state": {"ipq_layout": {}}}
    with pytest.raises(CheckpointError, match="an iPQ training checkpoint .*: prune the trained model before iPQ, or the packed file after it"):
        prune_checkpoint(mid_ipq, [0])


def test_the_cli_writes_nothing_on_a_bad_keep(layerdrop_lm, tmp_path):
    result = run(["quant-noise", "prune", layerdrop_lm, "--keep", "0,9", "-o", tmp_path / "x.pt"], check=False)
    assert result.returncode == 2 and result.output.strip().endswith("--keep 0,9: layer 9 is out of range: decoder.layers has 4 (0 to 3)")
    assert not list(tmp_path.iterdir())
