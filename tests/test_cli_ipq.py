"""iPQ through fairseq-train, compressed checkpoints through fairseq-eval-lm and quant-noise."""
import json
import re
import sys

import pytest
import torch

from conftest import PLUGIN, SCHEDULE, eval_lm_ppl, ipq_train, last_valid_ppl, run

def test_schedule_runs_stage_by_stage_and_eval_lm_matches_training(ipq, lm_data):
    save, output = ipq
    assert "ipq stage 0 (ffn) quantized at update 0" in output
    assert "ipq stage 1 (attention_and_embeddings) quantized at update 3" in output
    assert re.search(r"ipq calibration: input statistics of 9 weights over \d+ training batches", output)
    assert "k-means objective (weights)" in output and "decoder.layers.1.self_attn.v_proj [64, 64] -> 16 x 4 centroids, k-means objective (activations)" in output
    ppl = eval_lm_ppl(lm_data, save / "checkpoint_last.pt", "--user-dir", PLUGIN)
    assert ppl == pytest.approx(last_valid_ppl(output), rel=5e-3)


def test_checkpoint_stores_codes_not_dense_weights(ipq):
    state = torch.load(ipq[0] / "checkpoint_last.pt", weights_only=False)["model"]
    assert "decoder.layers.0.fc1.weight" not in state and "decoder.embed_tokens.weight" not in state
    assert state["decoder.layers.0.fc1.weight_pq.codes"].dtype == torch.uint8
    assert state["decoder.layers.0.fc1.weight_pq.centroids"].shape == (16, 4)
    # tied embeddings / output projection: one codebook, stored once
    assert state["decoder.output_projection.weight_pq.centroids"].data_ptr() == state["decoder.embed_tokens.weight_pq.centroids"].data_ptr()


def test_pack_size_matches_prediction_and_eval_matches(ipq, lm_data, tmp_path):
    save, output = ipq
    packed = tmp_path / "packed.pt"
    run(["quant-noise", "pack", save / "checkpoint_last.pt", packed])
    out = run(["quant-noise", "size", packed, "--json"]).output
    report = json.loads(out[out.index("{"):])
    assert report["packed"] is True
    assert abs(report["file_bytes"] - report["predicted_packed_file_bytes"]) <= 64  # serialized in memory: the file to the byte, bar the marker
    state = torch.load(packed, weights_only=False)
    assert "last_optimizer_state" not in state
    model = state["model"]
    assert model["decoder.layers.0.fc1.weight_pq.codes_packed"].dtype == torch.uint8  # 4-bit codes, two a byte
    assert model["decoder.layers.0.fc1.weight_pq.codes_packed"].numel() == 128 * 64 // 4 // 2
    assert model["decoder.layers.0.fc1.weight_pq.centroids"].dtype == torch.float16
    ppl = eval_lm_ppl(lm_data, packed, "--user-dir", PLUGIN)
    assert ppl == pytest.approx(last_valid_ppl(output), rel=1e-2)
    hub = run([sys.executable, "-c", HUB, tmp_path, packed.name, lm_data, PLUGIN]).output
    assert "hub log-prob" in hub and "compressed layers 13" in hub  # 4 FFN + 8 attention + 1 tied embedding
    again = run(["quant-noise", "pack", packed, tmp_path / "twice.pt"], check=False)
    assert again.returncode == 2 and "already packed" in again.output and not (tmp_path / "twice.pt").exists()


HUB = """
import sys
from fairseq.models.transformer_lm import TransformerLanguageModel
from quant_noise_plugin.compressed import provider_of
hub = TransformerLanguageModel.from_pretrained(sys.argv[1], sys.argv[2], data_name_or_path=sys.argv[3], user_dir=sys.argv[4])
providers = {id(provider_of(m)) for m in hub.models[0].modules() if provider_of(m) is not None}
print("compressed layers", len(providers))
tokens = hub.encode("And God said , Let there be light")
lprobs = hub.models[0].get_normalized_probs(hub.models[0](tokens[None, :-1]), log_probs=True)[0]
print("hub log-prob", float(lprobs.gather(-1, tokens[1:, None]).mean()))
"""

LOGITS = """
import sys, torch
if sys.argv[3] == "plugin":
    import quant_noise_plugin
from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]], arg_overrides={"data": sys.argv[2]})
model = models[0].eval()
tokens = torch.arange(4, 36).reshape(2, 16)
torch.save(model(tokens)[0], sys.argv[4])
"""


def _flip_tensor_byte(path, out, offset=10):
    """A copy of ``path`` with one byte flipped inside its largest tensor's data (zip local header parsed)."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    info = max((i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + offset] ^= 0x01
    out.write_bytes(bytes(data))


def test_packed_file_with_a_flipped_byte_is_refused_by_every_entry_point(ipq, lm_data, tmp_path):
    packed, bad = tmp_path / "packed.pt", tmp_path / "bad.pt"
    run(["quant-noise", "pack", ipq[0] / "checkpoint_last.pt", packed])
    _flip_tensor_byte(packed, bad)
    for command in (["quant-noise", "size", bad], ["quant-noise", "unpack", bad, tmp_path / "out.pt"]):
        result = run(command, check=False)
        assert result.returncode == 2 and f"{bad}: tensor decoder.embed_tokens.weight_pq.codes_packed fails its checksum" in result.output
    assert not (tmp_path / "out.pt").exists()
    result = run(["fairseq-eval-lm", lm_data, "--path", bad, "--user-dir", PLUGIN, "--cpu", "--max-tokens", "1024",
                  "--tokens-per-sample", "64"], check=False)
    assert result.returncode != 0 and "fairseq-eval-lm: error: " in result.output and "fails its checksum" in result.output
    assert "Traceback" not in result.output
    # a file packed before checksums (format 1) still loads, with a one-line notice
    state = torch.load(packed, weights_only=False)
    del state["model"]["_quant_noise_checksums"], state["quant_noise"]["config_crc32"]
    state["quant_noise"]["format"] = 1
    torch.save(state, tmp_path / "old.pt")
    result = run(["quant-noise", "size", tmp_path / "old.pt"])
    assert result.output.count("packed before checksums") == 1 and "this file on disk" in result.output
    # the config is covered too
    state = torch.load(packed, weights_only=False)
    state["cfg"]["model"]["dropout"] = 0.5
    torch.save(state, tmp_path / "cfg.pt")
    result = run(["quant-noise", "size", tmp_path / "cfg.pt"], check=False)
    assert result.returncode == 2 and "its config or schedule fails its checksum" in result.output


def test_unpack_gives_a_checkpoint_stock_fairseq_loads_with_the_same_logits(ipq, lm_data, tmp_path):
    save, _ = ipq
    dense = tmp_path / "dense.pt"
    run(["quant-noise", "unpack", save / "checkpoint_last.pt", dense])
    task = torch.load(dense, weights_only=True)["cfg"]["task"]
    assert task["_name"] == "language_modeling" and not [k for k in task if k.startswith("ipq_")]  # a stock task config
    run([sys.executable, "-c", LOGITS, save / "checkpoint_last.pt", lm_data, "plugin", tmp_path / "a.pt"])
    run([sys.executable, "-c", LOGITS, dense, lm_data, "stock", tmp_path / "b.pt"])  # no plugin imported
    assert torch.allclose(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"), atol=1e-4)
    ppl_stock = eval_lm_ppl(lm_data, dense)
    ppl_plugin = eval_lm_ppl(lm_data, save / "checkpoint_last.pt", "--user-dir", PLUGIN)
    assert ppl_stock == pytest.approx(ppl_plugin, rel=1e-4)


def test_activation_objective_gives_other_codes_than_the_weights_objective(ipq, lm_data, dense_lm, tmp_path):
    """The same schedule with stage 2's k-means on the weights alone: stage 1's codes are the same, stage 2's are not
    (codes stay frozen while the centroids finetune, so the fixture's final codes are the k-means' own)."""
    plain = tmp_path / "weights.yaml"
    plain.write_text(SCHEDULE.replace("objective: activations", "objective: weights"))
    ipq_train(lm_data, tmp_path / "run", dense_lm, plain, max_update=4)
    ours = torch.load(ipq[0] / "checkpoint_last.pt", weights_only=False)["model"]
    theirs = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=False)["model"]
    assert torch.equal(ours["decoder.layers.0.fc1.weight_pq.codes"], theirs["decoder.layers.0.fc1.weight_pq.codes"])
    for layer in ("decoder.embed_tokens", "decoder.layers.0.self_attn.q_proj", "decoder.layers.1.self_attn.out_proj"):
        key = f"{layer}.weight_pq.codes"
        assert (ours[key] != theirs[key]).float().mean() > 0.05, layer


def test_output_objective_chooses_codes_by_error_feedback(ipq, lm_data, dense_lm, tmp_path):
    """Stage 2 on the output objective: its layers (the tied embedding through its output projection too) start from
    the activations objective's k-means, then get other codes (error feedback) and centroids (least squares)."""
    schedule = tmp_path / "output.yaml"
    schedule.write_text(SCHEDULE.replace("objective: activations", "objective: output"))
    output = ipq_train(lm_data, tmp_path / "run", dense_lm, schedule, max_update=4).output
    assert "decoder.embed_tokens [" in output and "k-means objective (output)" in output
    assert "decoder.layers.1.self_attn.v_proj [64, 64] -> 16 x 4 centroids, k-means objective (output)" in output
    ours = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=False)["model"]
    activations = torch.load(ipq[0] / "checkpoint_last.pt", weights_only=False)["model"]
    assert torch.equal(ours["decoder.layers.0.fc1.weight_pq.codes"], activations["decoder.layers.0.fc1.weight_pq.codes"])
    for layer in ("decoder.embed_tokens", "decoder.layers.0.self_attn.q_proj", "decoder.layers.1.self_attn.out_proj"):
        key = f"{layer}.weight_pq.codes"
        assert (ours[key] != activations[key]).float().mean() > 0.05, layer


def test_restore_file_quantized_by_another_schedule_is_rejected(ipq, lm_data, tmp_path, schedule_file):
    other = tmp_path / "other.yaml"
    other.write_text(SCHEDULE.replace("n_centroids: 16", "n_centroids: 8"))
    result = ipq_train(lm_data, tmp_path / "run", ipq[0] / "checkpoint_last.pt", other, check=False)
    assert result.returncode != 0
    assert "is already quantized by another schedule" in result.output


def test_schedule_errors_stop_before_training(lm_data, dense_lm, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: ffn, layers: decoder\\\\.layers\\\\.\\\\d+\\\\.fc1, updates: 2}\n")
    result = ipq_train(lm_data, tmp_path / "run", dense_lm, bad, check=False)
    assert result.returncode != 0 and "stage 0 (ffn): key layers: regex" in result.output
    assert "num_updates" not in result.output


def test_schedule_command_previews_stages(dense_lm, schedule_file):
    out = run(["quant-noise", "schedule", dense_lm, schedule_file]).stdout
    assert "stage 0 'ffn': updates 0..2" in out and "stage 1 'attention_and_embeddings': updates 3..5" in out
    assert "decoder.layers.1.fc2" in out and "bs=4" in out and "K=16" in out and "1.00 bits/w" in out
    assert "(tied: decoder.output_projection)" in out
    assert out.count("predicted size after stage") == 2


def test_schedule_preview_with_calibration_data_shows_each_objectives_errors(dense_lm, schedule_file, lm_data):
    out = run(["quant-noise", "schedule", dense_lm, schedule_file, "--calibrate", lm_data, "--calibration-batches", "4"]).stdout
    number = r"([\d.]+)"
    triple = " -> ".join([number] * 3)
    rows = re.findall(rf"stage's objective (\w+): weight error {triple}, output error {triple}, with E\[x x\^T\]: {triple}", out)
    assert len(rows) == 13 and [r[0] for r in rows] == ["weights"] * 4 + ["activations"] * 9  # every layer of both stages
    errors = [[float(x) for x in r[1:]] for r in rows]
    # each fit is best at what it minimizes, on the sum over layers: weights, the diagonal estimate, the output error
    assert sum(e[0] for e in errors) < min(sum(e[1] for e in errors), sum(e[2] for e in errors))
    assert sum(e[4] for e in errors) < sum(e[3] for e in errors)
    assert sum(e[8] for e in errors) < min(sum(e[6] for e in errors), sum(e[7] for e in errors))


def test_damaged_checkpoints_get_one_line_errors(dense_lm, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(dense_lm.read_bytes()[: 5000])
    result = run(["quant-noise", "size", broken], check=False)
    assert result.returncode == 2
    assert f"{broken}: not a torch checkpoint (truncated or corrupted?)" in result.output
    result = run(["quant-noise", "pack", tmp_path / "missing.pt", tmp_path / "out.pt"], check=False)
    assert result.returncode == 2 and "no such checkpoint file" in result.output


def test_distillation_from_the_uncompressed_model(lm_data, dense_lm, schedule_file, tmp_path):
    """The KL term is logged, is positive once layers are quantized, and changes what training learns."""
    import torch

    distilled = ipq_train(lm_data, tmp_path / "kd", dense_lm, schedule_file, "--ipq-distill-weight", "1.0", max_update=2)
    terms = [float(m) for m in re.findall(r"train_inner .* distill=([\d.]+)", distilled.output)]
    assert terms and all(t > 0 for t in terms)  # the student (quantized FFN) differs from the dense teacher
    # the same run with a 1000x weaker term (CPU training here is bit-identical from run to run): other centroids
    ipq_train(lm_data, tmp_path / "weak", dense_lm, schedule_file, "--ipq-distill-weight", "0.001", max_update=2)
    weights = [torch.load(tmp_path / run / "checkpoint_last.pt", weights_only=False)["model"] for run in ("kd", "weak")]
    centroids = [k for k in weights[0] if k.endswith("weight_pq.centroids")]
    assert centroids and max((weights[0][k] - weights[1][k]).abs().max().item() for k in centroids) > 1e-6


def test_quant_noise_commands_print_their_own_lines_only(ipq, lm_data, tmp_path):
    """No fairseq import notice or dictionary line before a command's own output, unless --verbose."""
    save, _ = ipq
    checkpoint = save / "checkpoint_last.pt"
    for cmd in (["size", checkpoint], ["pack", checkpoint, tmp_path / "p.pt"], ["unpack", checkpoint, tmp_path / "u.pt"]):
        out = run(["quant-noise", *cmd, "--data", lm_data]).output
        assert "tensorboardX" not in out and "dictionary:" not in out and "INFO" not in out, out[:500]
        assert out.strip()  # each says what it did
    verbose = run(["quant-noise", "--verbose", "size", checkpoint, "--data", lm_data]).output
    assert "dictionary: " in verbose


def test_codes_that_move_are_reassigned_and_a_resumed_run_reassigns_alike(lm_data, dense_lm, tmp_path):
    """(The resume test of iPQ: tests/test_robustness.py kills at other points.) reassign_every: 1 in both stages (the second on the activations objective): after each finetuning update the
    stage's blocks move to the centroid nearest their fitted weight; a run stopped inside stage 2 and rerun ends with
    the straight run's codes, and fairseq-eval-lm reads the training checkpoint (its targets are not model weights)."""
    moving = tmp_path / "moving.yaml"
    moving.write_text(SCHEDULE.replace("updates: 3", "updates: 3\n    reassign_every: 1"))
    assert "updates 3..5; codes reassigned every 1 updates" in run(["quant-noise", "schedule", dense_lm, moving]).stdout
    straight = ipq_train(lm_data, tmp_path / "straight", dense_lm, moving, "--lr", "0.01").output
    for update in (1, 2, 4, 5):
        assert f"codes reassigned at update {update}" in straight
    moved = [float(m) for m in re.findall(r"codes reassigned at update \d: ([\d.]+)% of blocks moved", straight)]
    assert max(moved) > 0, moved
    first = ipq_train(lm_data, tmp_path / "resumed", dense_lm, moving, "--lr", "0.01", max_update=4).output
    assert "quantized at update 3" in first  # stopped inside stage 2, after its calibration and first reassignment
    second = ipq_train(lm_data, tmp_path / "resumed", dense_lm, moving, "--lr", "0.01").output  # same command again
    assert "Loaded checkpoint" in second and "quantized at update" not in second
    ours = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=False)["model"]
    theirs = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=False)["model"]
    assert "decoder.layers.0.fc1.weight_pq.target" in theirs and sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.allclose(ours[key].float(), theirs[key].float(), atol=1e-5), key
    assert eval_lm_ppl(lm_data, tmp_path / "straight" / "checkpoint_last.pt", "--user-dir", PLUGIN) < 1e4
