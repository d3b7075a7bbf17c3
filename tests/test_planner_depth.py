"""Depth on the planner's menu: on a model trained with LayerDrop, `quant-noise plan` also plans the budget with every
other layer kept and keeps the depth that predicts the lower loss; its YAML then names the layers to keep, and the
schedule refuses a model that was not pruned that way."""
import re

import pytest
import yaml

from conftest import TINY_LM, ipq_train, run, train_lm
from quant_noise_plugin.planner.depth import depth_candidates, pruned_copy
from quant_noise_plugin.sharing import shared_chunks
from test_sharing import Stack, shared_stack


def test_candidates_are_every_layer_every_other_and_every_fourth_by_whole_chunks():
    assert [c.kept for c in depth_candidates(Stack(depth=8), "decoder.layers")] == [list(range(8)), [0, 2, 4, 6], [0, 4]]
    assert [c.kept for c in depth_candidates(Stack(depth=4), "decoder.layers")] == [[0, 1, 2, 3], [0, 2]]
    assert [c.kept for c in depth_candidates(shared_stack(chunk=2, depth=4), "decoder.layers")] == [[0, 1, 2, 3], [0, 1]]
    assert [c.kept for c in depth_candidates(Stack(depth=1), "decoder.layers")] == [[0]]
    model = shared_stack(chunk=2, depth=8)
    pruned = pruned_copy(model, depth_candidates(model, "decoder.layers")[1])
    assert shared_chunks(pruned.decoder.layers) == [(0, 1), (2, 3)]  # chunks 0 and 2 kept, still shared
    assert len(model.decoder.layers) == 8  # the model itself is left as it was


@pytest.fixture(scope="module")
def layerdrop_lm(lm_data, tmp_path_factory):
    """4 layers trained with LayerDrop 0.2: pruning to 2 raises its calibration loss (4.82 -> 4.90 nats on 4 batches when written)."""
    save = tmp_path_factory.mktemp("layerdrop_planned")
    train_lm(lm_data, save, "--arch", "qn_transformer_lm", "--decoder-layers", "4", *TINY_LM[2:], "--decoder-layerdrop", "0.2",
             max_update=150)
    return save / "checkpoint_last.pt"


def plan(checkpoint, lm_data, output, size, *extra):
    out = run(["quant-noise", "plan", checkpoint, "--target-size", size, "--calibrate", lm_data, "-o", output,
               "--calibration-batches", "2", *extra]).output
    predicted = {m[0]: float(m[1]) for m in re.findall(r"  (all 4 layers of decoder.layers|decoder.layers 0,2 of 4): calibration loss "
                                                        r"[\d.]+ before iPQ, planned rise [-+\d.]+, ([\d.]+) predicted", out)}
    return out, predicted


def test_the_planner_drops_layers_when_the_budget_demands_it_and_keeps_them_when_not(layerdrop_lm, lm_data, tmp_path):
    small = tmp_path / "small.yaml"
    out, predicted = plan(layerdrop_lm, lm_data, small, "90KB")
    assert "the lowest predicted loss keeps decoder.layers 0,2 of 4" in out
    assert predicted["decoder.layers 0,2 of 4"] < predicted["all 4 layers of decoder.layers"]
    assert yaml.safe_load(small.read_text())["pruned"] == {"stack": "decoder.layers", "kept": [0, 2], "of": 4}
    refused = run(["quant-noise", "schedule", layerdrop_lm, small], check=False)
    assert refused.returncode != 0 and refused.output.strip().splitlines()[-1].endswith(
        "key pruned: planned for decoder.layers 0,2 of 4 kept, and this model has 4: run `quant-noise prune CHECKPOINT --keep 0,2 "
        "--stack decoder -o PRUNED.pt` and start iPQ from PRUNED.pt")
    pruned = tmp_path / "pruned.pt"
    run(["quant-noise", "prune", layerdrop_lm, "--keep", "0,2", "-o", pruned])
    assert "stage" in run(["quant-noise", "schedule", pruned, small]).output

    large = tmp_path / "large.yaml"
    out, predicted = plan(layerdrop_lm, lm_data, large, "300KB")
    assert "the lowest predicted loss keeps all 4 layers of decoder.layers: pruning predicts a higher loss" in out
    assert predicted["all 4 layers of decoder.layers"] < predicted["decoder.layers 0,2 of 4"]
    assert "pruned" not in yaml.safe_load(large.read_text())



def test_a_model_trained_without_layerdrop_keeps_its_depth(dense_lm, lm_data, tmp_path):
    out, _ = plan(dense_lm, lm_data, tmp_path / "plan.yaml", "60KB")
    assert "Depth" not in out and "pruned" not in yaml.safe_load((tmp_path / "plan.yaml").read_text())


CANDIDATE = """
defaults:
  Embedding: {block_size: 4, n_centroids: 256}
final_scalar_bits: 8
stages:
  - {name: embeddings, layers: 'decoder\\.embed_tokens', updates: 10}
"""
OVER_BUDGET = """
final_scalar_bits: 8
stages:
  - {name: ffn, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 10}
"""


def test_the_check_keeps_a_candidate_schedule_that_measures_better_than_the_plan(dense_lm, lm_data, tmp_path):
    """A plan from a menu cut to K=4 must put the embedding at 0.5 bits a weight; the candidate spends the same budget
    on K=256 there. Measured with every weight quantized at once, the candidate wins and is written, saying so."""
    (tmp_path / "embeddings_k256.yaml").write_text(CANDIDATE)
    (tmp_path / "ffn_only.yaml").write_text(OVER_BUDGET)
    output = tmp_path / "plan.yaml"
    out, _ = plan(dense_lm, lm_data, output, "200KB", "--centroids", "4", "--candidates", tmp_path / "embeddings_k256.yaml",
                  tmp_path / "ffn_only.yaml")
    rows = dict(re.findall(r"\n  (the plan|embeddings_k256.yaml): ([\d.]+), [\d,]+ bytes", out))
    assert float(rows["embeddings_k256.yaml"]) < float(rows["the plan"])
    assert re.search(r"\n  ffn_only.yaml: over the budget \([\d,]+ > 200,000 bytes\)", out)
    assert "wrote " + str(output) + ": the candidate embeddings_k256.yaml (the plan below measured worse)" in out
    written = output.read_text()
    assert written.startswith("# Checked by measurement") and written.endswith(CANDIDATE.lstrip("\n"))
    assert "stage" in run(["quant-noise", "schedule", dense_lm, output]).output


def test_the_ipq_task_measures_its_plan_against_candidates_and_runs_the_better(dense_lm, lm_data, tmp_path):
    candidate = tmp_path / "embeddings_k256.yaml"
    candidate.write_text(CANDIDATE)
    out = train_lm(lm_data, tmp_path / "ipq", "--task", "ipq_language_modeling", "--ipq-target-size", "200KB", "--ipq-candidates",
                   candidate, "--finetune-from-model", dense_lm, "--arch", "qn_transformer_lm", *TINY_LM, "--lr", "0.0005",
                   max_update=2).output
    rows = dict(re.findall(r"ipq:   (the plan|embeddings_k256.yaml): ([\d.]+), [\d,]+ bytes", out))
    assert set(rows) == {"the plan", "embeddings_k256.yaml"}
    written = (tmp_path / "ipq" / "ipq_plan.yaml").read_text()
    assert written.startswith("# Checked by measurement") or "\n# Checked by measurement" in written
    kept_candidate = "embeddings_k256.yaml measured lower than the plan: written instead" in out
    assert kept_candidate != ("the plan measured lowest: kept" in out)  # one verdict, and the file says the same
    if kept_candidate:  # (on this model the plan is nearly the candidate: the two losses agree to 4 decimals)
        assert float(rows["embeddings_k256.yaml"]) <= float(rows["the plan"]) and written.endswith(CANDIDATE.lstrip("\n"))
    else:
        assert float(rows["the plan"]) <= float(rows["embeddings_k256.yaml"]) and written.count("# Planned by --ipq-target-size") == 1
    refused = ipq_train(lm_data, tmp_path / "bad", dense_lm, candidate, "--ipq-candidates", candidate, check=False)
    assert refused.returncode != 0 and "--ipq-candidates" in refused.output and "add --ipq-target-size" in refused.output
