"""Encoders: the verse-pair data, qn_roberta, masked-LM -> sentence prediction -> iPQ -> validate, the hub."""
import json
import os
import sys

import pytest
import torch

from conftest import PLUGIN, run
from quant_noise_plugin.data_prep import PAIR_LABELS, _splits, verse_pairs

CLS = ["--num-classes", "3", "--init-token", "0", "--separator-token", "2", "--max-positions", "64", "--shorten-method", "truncate"]
COMMON = ["--optimizer", "adam", "--lr", "0.0005", "--max-tokens", "2048", "--log-format", "simple", "--log-interval", "1", "--cpu",
          "--num-workers", "0", "--no-epoch-checkpoints"]
SCHEDULE = """
defaults:
  Linear: {block_size: 4, n_centroids: 16}
  Embedding: {block_size: 4, n_centroids: 16}
kmeans_iterations: 5
stages:
  - {name: embeddings, layers: 'encoder\\.sentence_encoder\\.embed_tokens', updates: 2}
  - name: rest
    layers: 'encoder\\.(sentence_encoder\\.layers\\.\\d+\\.(fc[12]|self_attn\\.(q|k|v|out)_proj)|lm_head\\.dense)|classification_heads\\.\\w+\\.(dense|out_proj)'
    updates: 2
"""


def test_verse_pairs_are_balanced_labelled_right_and_stay_in_their_split():
    verses = [(book, chapter, v) for book in range(3) for chapter in range(1, 41) for v in range(1, 9)]
    splits = _splits(verses)
    seen = {}
    for name, split_verses in splits.items():
        pairs = verse_pairs(split_verses, seed=0)
        counts = {label: sum(1 for p in pairs if p[2] == label) for label in PAIR_LABELS}
        assert len(set(counts.values())) == 1 and counts["next"] > 0, counts  # balanced
        allowed = set(split_verses)
        for a, b, label in pairs:
            assert a in allowed and b in allowed  # no verse of another split's chapters
            if label == "next":
                assert a[:2] == b[:2] and b[2] == a[2] + 1
            elif label == "same_chapter":
                assert a[:2] == b[:2] and abs(b[2] - a[2]) > 1
            else:
                assert a[0] != b[0]
        seen[name] = {v[:2] for p in pairs for v in p[:2]}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["valid"]) and not (seen["valid"] & seen["test"])
    assert verse_pairs(splits["test"], seed=0) == verse_pairs(splits["test"], seed=0)  # deterministic


def test_the_prepared_pair_data_is_binarized_for_sentence_prediction(tiny_data):
    cls = tiny_data / "cls"
    info = json.loads((tiny_data / ".complete.json").read_text())["stats"]["cls"]
    for split in ("train", "valid", "test"):
        labels = (cls / "raw" / f"{split}.label").read_text().split()
        assert len(set(labels.count(label) for label in PAIR_LABELS)) == 1 and info[split]["pairs"] == len(labels)
        for side in ("input0", "input1", "label"):
            assert (cls / "bin" / side / f"{split}.bin").stat().st_size > 0
    # the masked-LM pretraining data's dictionary, so a pretrained encoder's embeddings line up
    assert (cls / "bin" / "input0" / "dict.txt").read_text() == (tiny_data / "lm" / "bin" / "dict.txt").read_text()


def test_registered_names():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    import quant_noise_plugin  # noqa: F401

    assert {"qn_roberta", "qn_roberta_base", "qn_roberta_small", "qn_roberta_tiny"} <= set(ARCH_MODEL_REGISTRY)
    assert {"qn_masked_lm", "qn_sentence_prediction"} <= set(CRITERION_REGISTRY)
    assert {"ipq_masked_lm", "ipq_sentence_prediction"} <= set(TASK_REGISTRY)


@pytest.fixture(scope="module")
def encoder_runs(tiny_data, tmp_path_factory):
    """The user's path on the tiny slice: masked-LM pretraining, pair classification, iPQ of the classifier."""
    root = tmp_path_factory.mktemp("encoder")
    lm, cls = tiny_data / "lm" / "bin", tiny_data / "cls" / "bin"
    noise = ["--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "8"]
    pretrain = run(["fairseq-train", lm, "--user-dir", PLUGIN, "--task", "masked_lm", "--arch", "qn_roberta_tiny", "--criterion", "masked_lm",
                    "--tokens-per-sample", "64", "--max-update", "6", "--save-dir", root / "mlm", *noise, *COMMON]).output
    finetune = run(["fairseq-train", cls, "--user-dir", PLUGIN, "--task", "sentence_prediction", "--arch", "qn_roberta_tiny",
                    "--criterion", "sentence_prediction", *CLS, "--finetune-from-model", root / "mlm" / "checkpoint_last.pt",
                    "--max-update", "8", "--save-dir", root / "cls", *noise, *COMMON]).output
    schedule = root / "cls.yaml"
    schedule.write_text(SCHEDULE)
    ipq = run(["fairseq-train", cls, "--user-dir", PLUGIN, "--task", "ipq_sentence_prediction", "--ipq-config", schedule,
               "--arch", "qn_roberta_tiny", "--criterion", "sentence_prediction", *CLS, "--finetune-from-model",
               root / "cls" / "checkpoint_last.pt", "--max-update", "4", "--save-dir", root / "ipq", *COMMON]).output
    return root, cls, {"pretrain": pretrain, "finetune": finetune, "ipq": ipq}


def validate(data, path, *extra):
    out = run(["fairseq-validate", data, "--task", "sentence_prediction", "--criterion", "sentence_prediction", *CLS, "--path", path,
               "--valid-subset", "test", "--cpu", "--max-tokens", "4096", *extra]).output
    return float([line for line in out.splitlines() if "valid on 'test' subset" in line][-1].split("| accuracy ")[1].split(" |")[0])


def test_masked_lm_then_classification_then_ipq_then_validate(encoder_runs, tmp_path):
    root, cls, logs = encoder_runs
    assert "quant-noise: pq=0.1 (block 8)" in logs["pretrain"]
    # the classifier's head, registered after the model was built, is noised too
    assert "on 2 layers" in logs["finetune"] and "Overwriting classification_heads.sentence_classification_head.dense.weight" in logs["finetune"]
    assert "ipq stage 1 (rest) quantized at update 2" in logs["ipq"]
    assert "classification_heads.sentence_classification_head.out_proj" in logs["ipq"]
    compressed = root / "ipq" / "checkpoint_last.pt"
    state = torch.load(compressed, weights_only=False)["model"]
    # RoBERTa's LM head shares the embedding: quantized once with it, no dense copy left behind
    assert "encoder.lm_head.weight" not in state and "encoder.sentence_encoder.embed_tokens.weight" not in state
    assert state["encoder.lm_head.weight_pq.centroids"].data_ptr() == state["encoder.sentence_encoder.embed_tokens.weight_pq.centroids"].data_ptr()
    accuracy = validate(cls, compressed, "--user-dir", PLUGIN)
    assert 0 < accuracy < 100
    packed = tmp_path / "packed.pt"
    run(["quant-noise", "pack", compressed, packed, "--scalar-bits", "8"])
    assert validate(cls, packed, "--user-dir", PLUGIN) == pytest.approx(accuracy, abs=2.0)
    w8a8 = tmp_path / "w8a8.pt"
    out = run(["quant-noise", "pack", compressed, w8a8, "--scalar-bits", "8", "--activation-bits", "8", "--calibrate", cls]).output
    assert "encoder.lm_head.dense never ran" in out  # a classifier does not use the LM head
    assert 0 < validate(cls, w8a8, "--user-dir", PLUGIN) < 100
    int4 = tmp_path / "int4.pt"  # the head's few rows as bit-packed codes: fairseq's head logic still finds their shapes
    run(["quant-noise", "pack", root / "cls" / "checkpoint_last.pt", int4, "--scalar-bits", "4"])
    from quant_noise_plugin.models.qn_roberta import head_shapes

    assert head_shapes(torch.load(int4, weights_only=True)["model"], 64) == {"sentence_classification_head": (3, 64)}  # qn_roberta_tiny: 64 wide
    assert 0 < validate(cls, int4, "--user-dir", PLUGIN) < 100
    dense = tmp_path / "dense.pt"
    run(["quant-noise", "unpack", packed, dense])
    assert validate(cls, dense) == pytest.approx(validate(cls, packed, "--user-dir", PLUGIN), abs=1e-6)  # stock fairseq


def test_plan_meets_its_budget_on_a_classifier(encoder_runs, tmp_path):
    import re

    root, cls, _ = encoder_runs
    plan = tmp_path / "plan.yaml"
    run(["quant-noise", "plan", root / "cls" / "checkpoint_last.pt", "--target-ratio", "10", "--calibrate", cls, "--calibration-batches", "2",
         "--updates", "4", "-o", plan])
    text = plan.read_text()
    predicted, target = (int(g.replace(",", "")) for g in re.search(r"a packed file of ([\d,]+) bytes predicted for a target of ([\d,]+)", text).groups())
    assert 0.99 * target <= predicted <= target
    assert "classification_heads" in text  # the head is planned with the encoder


def test_output_objective_on_a_classifier_fits_its_unused_lm_head_on_its_weights(encoder_runs, tmp_path):
    """The classifier never runs the masked-LM head, so no calibration input reaches it: that weight falls back to the
    weights objective (it used to stop the run: "no calibration input reached this weight"), the others fit the output."""
    root, cls, _ = encoder_runs
    schedule = tmp_path / "out.yaml"
    schedule.write_text(SCHEDULE.replace("kmeans_iterations: 5", "kmeans_iterations: 5\nobjective: output"))
    out = run(["fairseq-train", cls, "--user-dir", PLUGIN, "--task", "ipq_sentence_prediction", "--ipq-config", schedule,
               "--arch", "qn_roberta_tiny", "--criterion", "sentence_prediction", *CLS, "--finetune-from-model",
               root / "cls" / "checkpoint_last.pt", "--max-update", "4", "--save-dir", tmp_path / "ipq", *COMMON]).output
    assert "encoder.lm_head.dense saw no calibration input" in out
    assert "encoder.lm_head.dense [64, 64] -> 16 x 4 centroids, k-means objective (weights)" in out
    assert "classification_heads.sentence_classification_head.dense [64, 64] -> 16 x 4 centroids, k-means objective (output)" in out
    assert 0 < validate(cls, tmp_path / "ipq" / "checkpoint_last.pt", "--user-dir", PLUGIN) < 100


HUB = """
import sys, torch
from fairseq.models.roberta import RobertaModel
hub = RobertaModel.from_pretrained(sys.argv[1], sys.argv[2], data_name_or_path=sys.argv[3], user_dir=sys.argv[4], bpe=None)
hub.eval()
d = hub.task.source_dictionary
a, b = d.encode_line("And God said , Let there be light", add_if_not_exist=False), d.encode_line("and there was light .", add_if_not_exist=False)
tokens = torch.cat([torch.tensor([0]), a, torch.tensor([2]), b]).long()
print("probs", hub.predict("sentence_classification_head", tokens).exp().tolist())
other = torch.cat([torch.tensor([0]), b, torch.tensor([2]), d.encode_line("In the beginning", add_if_not_exist=False)]).long()
print("other", hub.predict("sentence_classification_head", other).exp().tolist())
"""


def test_the_compressed_classifier_loads_in_the_hub(encoder_runs, tmp_path):
    root, cls, _ = encoder_runs
    packed = tmp_path / "packed.pt"
    run(["quant-noise", "pack", root / "ipq" / "checkpoint_last.pt", packed])
    predicted = []
    for path in (root / "ipq" / "checkpoint_last.pt", packed):
        out = run([sys.executable, "-c", HUB, path.parent, path.name, cls, PLUGIN]).output
        probs, other = (json.loads([line for line in out.splitlines() if line.startswith(tag)][0][6:])[0] for tag in ("probs ", "other "))
        assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-4
        assert max(abs(p - q) for p, q in zip(probs, other)) > 1e-4  # the head reads its input pair
        predicted.append(probs)
    # the packed file (fp16 centroids) predicts what the iPQ training checkpoint predicts
    assert max(abs(p - q) for p, q in zip(*predicted)) < 5e-3


def test_shipped_encoder_schedules_plan_on_the_small_preset(tmp_path):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from quant_noise_plugin.schedule import load_schedule, plan_schedule

    data = tmp_path / "cls"
    for side in ("input0", "label"):
        (data / side).mkdir(parents=True)
    (data / "input0" / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(500)))
    (data / "label" / "dict.txt").write_text("".join(f"{label} 1\n" for label in PAIR_LABELS))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--user-dir", PLUGIN, "--task", "sentence_prediction", "--arch", "qn_roberta_small",
                                                "--criterion", "sentence_prediction", "--num-classes", "3", "--cpu"])
    cfg = convert_namespace_to_omegaconf(args)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    for name in ("qn_roberta_cls.yaml", "qn_roberta_cls_demo.yaml"):
        path = os.path.join(os.path.dirname(PLUGIN), "configs", "ipq", name)
        plans = plan_schedule(load_schedule(path), model, path)
        names = {n for stage in plans for layer in stage.layers for n in layer.names}
        assert "encoder.sentence_encoder.embed_tokens" in names and "encoder.lm_head" in names  # tied, quantized once
        assert "classification_heads.sentence_classification_head.dense" in names
        assert "encoder.sentence_encoder.layers.3.fc2" in names
