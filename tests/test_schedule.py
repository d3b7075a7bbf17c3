"""Schedule YAML parsing and validation against a model."""
from pathlib import Path

import pytest
import torch
from torch import nn

from quant_noise_plugin.schedule import ScheduleError, load_schedule, plan_schedule

REPO = Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.embed_tokens = nn.Embedding(100, 16)
        self.decoder.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.fc1, layer.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
            layer.self_attn = nn.Module()
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(layer.self_attn, p, nn.Linear(16, 16))
            self.decoder.layers.append(layer)
        self.decoder.output_projection = nn.Linear(16, 100, bias=False)
        self.decoder.output_projection.weight = self.decoder.embed_tokens.weight


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_shipped_schedules_parse_and_match_their_models():
    model = TinyLM()
    schedule = load_schedule(REPO / "configs/ipq/qn_transformer_lm.yaml")
    small = schedule
    for d in small.defaults.values():
        d.n_centroids = 16
    plans = plan_schedule(small, model)
    assert [p.name for p in plans] == ["ffn", "embeddings", "attention"]
    assert [len(p.layers) for p in plans] == [4, 1, 8]
    emb = plans[1].layers[0]
    assert emb.names == ["decoder.embed_tokens", "decoder.output_projection"]  # tied: one codebook
    assert plans[1].start_update == 300
    for name in ("qn_transformer.yaml", "paper_lm_wiki103.yaml"):
        load_schedule(REPO / "configs/ipq" / name)


def test_embeddings_first_schedule_puts_the_tied_embedding_first_with_more_centroids():
    schedule = load_schedule(REPO / "configs/ipq/qn_transformer_lm_embfirst_k1024.yaml")
    assert schedule.defaults["Embedding"].n_centroids == 1024 and schedule.total_updates == 800
    for d in schedule.defaults.values():
        d.n_centroids = 16  # TinyLM has too few blocks for 1024
    plans = plan_schedule(schedule, TinyLM())
    assert [p.name for p in plans] == ["embeddings", "ffn", "attention"]
    assert plans[0].layers[0].names == ["decoder.embed_tokens", "decoder.output_projection"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages:\n  - {name: a, layers: 'x', updates: 1, colour: red}\n", "stage 0: key colour"),
        ("stages:\n  - {name: a, layers: 'x', updates: ten}\n", "stage 0: key updates"),
        ("seed: one\nstages: []\n", "key seed"),
        ("stages:\n  - {name: a, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 0}\n", "stage 0 (a): key updates: must be > 0"),
        ("stages: []\n", "the schedule has no stage"),
        ("stages:\n  - {name: a, layers: 'x', updates: 1, block_size: {Conv2d: 4}}\n", "key block_size.Conv2d"),
        ("stages:\n  - {name: a, layers: '(', updates: 1}\n", "invalid regex"),
        ("objective: outputs\nstages:\n  - {name: a, layers: 'x', updates: 1}\n", "key objective: 'outputs' (use weights, activations, output)"),
        ("stages:\n  - {name: a, layers: 'x', updates: 1, objective: hessian}\n", "stage 0 (a): key objective: 'hessian'"),
        ("stages:\n  - {name: a, layers: 'x', updates: 4, reassign_every: -1}\n", "stage 0 (a): key reassign_every: must be >= 0"),
        ("stages:\n  - {name: a, layers: 'x', updates: 4, reassign_every: 4}\n", "below the stage's 4 updates, got 4"),
        ("stages:\n  - {name: a, layers: 'x', updates: 1, per_layer: [{layers: '('}]}\n", "stage 0 (a): key per_layer.0.layers: invalid regex"),
        ("stages:\n  - {name: a, layers: 'x', updates: 1, per_layer: [{layers: 'x'}]}\n", "key per_layer.0: sets neither block_size nor n_centroids"),
        ("stages:\n  - {name: a, layers: 'x', updates: 1, per_layer: [{layers: 'x', n_centroids: 0}]}\n", "key per_layer.0.n_centroids: must be > 0"),
        ("stages:\n  - {name: a, layers: 'x', updates: 1, per_layer: [{layers: 'x', bits: 3}]}\n", "stage 0: key per_layer.0: key bits"),
    ],
)
def test_bad_yaml_is_a_one_line_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ScheduleError) as err:
        load_schedule(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "stages, message",
    [
        # the reference's bug: a plain YAML scalar with \\. matches nothing -> must be an error
        ("  - {name: a, layers: decoder\\\\.layers\\\\.\\\\d+\\\\.fc1, updates: 1}\n", "stage 0 (a): key layers: regex"),
        ("  - {name: a, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 1, block_size: {Linear: 5}}\n", "layer decoder.layers.0.fc1 (shape (32, 16)): block_size 5"),
        ("  - {name: a, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 1, n_centroids: {Linear: 4096}}\n", "n_centroids 4096 but only 128 blocks"),
        ("  - {name: a, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 1, per_layer: [{layers: 'decoder\\.layers\\.0\\.fc2', n_centroids: 8}]}\n",
         "stage 0 (a): key per_layer.0.layers: regex 'decoder\\.layers\\.0\\.fc2' matches none of the stage's layers"),
        ("  - {name: a, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 1, per_layer: [{layers: 'decoder\\.layers\\.1\\.fc1', block_size: 3}]}\n",
         "layer decoder.layers.1.fc1 (shape (32, 16)): block_size 3"),
        ("  - {name: a, layers: 'decoder\\.layers\\.0\\.fc1', updates: 1}\n  - {name: b, layers: 'decoder\\.layers\\.\\d\\.fc1', updates: 1}\n",
         "stage 1 (b): layer decoder.layers.0.fc1 is already quantized by stage a"),
    ],
)
def test_schedule_that_does_not_fit_the_model_is_rejected(tmp_path, stages, message):
    text = "defaults:\n  Linear: {block_size: 4, n_centroids: 16}\nstages:\n" + stages
    schedule = load_schedule(write(tmp_path, text))
    with pytest.raises(ScheduleError) as err:
        plan_schedule(schedule, TinyLM(), "s.yaml")
    assert message in str(err.value)


def test_stage_regexes_match_whole_module_names(tmp_path):
    """A stage's `layers` must match the whole name (re.fullmatch): `fc1` alone names no layer, while
    `--quant-noise-exclude` searches anywhere in the name (next test)."""
    model = TinyLM()
    partial = load_schedule(write(tmp_path, "stages:\n  - {name: ffn, layers: 'fc1', updates: 1}\n"))
    with pytest.raises(ScheduleError, match=r"stage 0 \(ffn\): key layers: regex 'fc1' matches no Linear/Embedding layer"):
        plan_schedule(partial, model)
    whole = load_schedule(write(tmp_path, "defaults:\n  Linear: {block_size: 4, n_centroids: 4}\n"
                                          "stages:\n  - {name: ffn, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 1}\n"))
    names = [n for layer in plan_schedule(whole, model)[0].layers for n in layer.names]
    assert names == ["decoder.layers.0.fc1", "decoder.layers.1.fc1"]


def test_quant_noise_exclude_searches_anywhere_in_the_name():
    from quant_noise_plugin.quant_noise import QuantNoiseConfig, noise_targets

    model = TinyLM()
    every = noise_targets(model, QuantNoiseConfig(pq=0.1))
    no_fc1 = noise_targets(model, QuantNoiseConfig(pq=0.1, exclude="fc1"))
    assert set(every) - set(no_fc1) == {"decoder.layers.0.fc1", "decoder.layers.1.fc1"}
    no_emb = noise_targets(model, QuantNoiseConfig(pq=0.1, exclude="embed_tokens|output_projection"))
    assert "decoder.embed_tokens" in every and not any("embed_tokens" in n or "output_projection" in n for n in no_emb)


def test_stage_objective_overrides_the_schedule_objective(tmp_path):
    text = ("objective: activations\ndefaults:\n  Linear: {block_size: 4, n_centroids: 16}\n  Embedding: {block_size: 4, n_centroids: 16}\nstages:\n"
            "  - {name: a, layers: 'decoder\\.layers\\.\\d+\\.fc1', updates: 1, objective: weights}\n"
            "  - {name: b, layers: 'decoder\\.embed_tokens', updates: 1}\n")
    plans = plan_schedule(load_schedule(write(tmp_path, text)), TinyLM(), "s.yaml")
    assert [[p.objective for p in stage.layers] for stage in plans] == [["weights", "weights"], ["activations"]]


def test_per_layer_settings_override_the_stage_for_the_layers_they_match(tmp_path):
    text = ("defaults:\n  Linear: {block_size: 4, n_centroids: 16}\nstages:\n"
            "  - name: ffn\n    layers: 'decoder\\.layers\\.\\d+\\.fc[12]'\n    updates: 1\n    n_centroids: {Linear: 8}\n"
            "    per_layer:\n      - {layers: 'decoder\\.layers\\.1\\.fc1', block_size: 8, n_centroids: 32}\n"
            "      - {layers: 'decoder\\.layers\\.\\d+\\.fc1', n_centroids: 4}\n")
    layers = {p.name: (p.block_size, p.n_centroids) for p in plan_schedule(load_schedule(write(tmp_path, text)), TinyLM())[0].layers}
    # the first matching entry wins; a layer no entry matches keeps the stage's settings
    assert layers == {"decoder.layers.0.fc1": (4, 4), "decoder.layers.1.fc1": (8, 32), "decoder.layers.0.fc2": (4, 8), "decoder.layers.1.fc2": (4, 8)}


# --- pinned: defaults, limits, predicted sizes and tied-weight grouping, each to the value -------------------------


def test_a_plain_dict_gets_the_documented_defaults():
    from quant_noise_plugin.schedule import schedule_from_dict

    schedule = schedule_from_dict({"stages": [{"name": "a", "layers": "x", "updates": 3}]})  # a dict, not an omegaconf node
    assert (schedule.defaults["Linear"].block_size, schedule.defaults["Linear"].n_centroids) == (8, 256)
    assert (schedule.defaults["Embedding"].block_size, schedule.defaults["Embedding"].n_centroids) == (8, 256)
    assert (schedule.kmeans_iterations, schedule.seed, schedule.objective, schedule.final_scalar_bits) == (20, 0, "weights", None)
    stage = schedule.stages[0]
    assert (stage.reassign_every, stage.objective, stage.per_layer, stage.block_size) == (0, None, [], {})
    assert schedule.total_updates == 3 and schedule.largest_centroids == 256


def test_largest_centroids_and_total_updates_read_every_stage_and_per_layer_entry():
    from quant_noise_plugin.schedule import schedule_from_dict

    schedule = schedule_from_dict({"defaults": {"Linear": {"n_centroids": 16}, "Embedding": {"n_centroids": 32}}, "stages": [
        {"name": "a", "layers": "x", "updates": 3, "n_centroids": {"Linear": 64}},
        {"name": "b", "layers": "y", "updates": 5, "per_layer": [{"layers": "y", "n_centroids": 512}, {"layers": "z", "block_size": 4}]},
    ]})
    assert schedule.largest_centroids == 512 and schedule.total_updates == 8
    schedule.stages[1].per_layer[0].n_centroids = 8
    assert schedule.largest_centroids == 64


@pytest.mark.parametrize("key, bad, good", [
    ("kmeans_iterations: {}\n", 0, 1),
    ("final_scalar_bits: {}\n", 5, 4),
    ("final_scalar_bits: {}\n", 9, 8),
    ("stages:\n  - {{name: a, layers: 'x', updates: 1, block_size: {{Linear: {}}}}}\n", 0, 1),
    ("stages:\n  - {{name: a, layers: 'x', updates: 1, n_centroids: {{Embedding: {}}}}}\n", 0, 1),
    ("stages:\n  - {{name: a, layers: 'x', updates: 1, per_layer: [{{layers: 'x', block_size: {}}}]}}\n", 0, 1),
    ("stages:\n  - {{name: a, layers: 'x', updates: {}}}\n", 0, 1),
    ("stages:\n  - {{name: a, layers: 'x', updates: 2, reassign_every: {}}}\n", 2, 1),
])
def test_each_limit_refuses_the_first_bad_value_and_takes_the_first_good_one(tmp_path, key, bad, good):
    stage = "" if key.startswith("stages") else "stages:\n  - {name: a, layers: 'x', updates: 1}\n"
    with pytest.raises(ScheduleError, match=f"got {bad}|{bad} \\(use 4, 8 or null\\)"):
        load_schedule(write(tmp_path, key.format(bad) + stage))
    load_schedule(write(tmp_path, key.format(good) + stage))


def test_defaults_are_checked_per_layer_type(tmp_path):
    with pytest.raises(ScheduleError, match=r"key defaults\.Conv1d: unknown layer type \(use Linear, Embedding\)"):
        load_schedule(write(tmp_path, "defaults:\n  Conv1d: {block_size: 4}\nstages:\n  - {name: a, layers: 'x', updates: 1}\n"))
    with pytest.raises(ScheduleError, match=r"key defaults\.Linear: a mapping of settings"):
        load_schedule(write(tmp_path, "defaults:\n  Linear: 4\nstages:\n  - {name: a, layers: 'x', updates: 1}\n"))


def test_a_type_error_names_the_key_with_the_first_line_of_omegaconf_s_reason(tmp_path):
    with pytest.raises(ScheduleError) as err:
        load_schedule(write(tmp_path, "stages:\n  - {name: a, layers: 'x', updates: ten}\n"))
    path = tmp_path / "s.yaml"
    assert str(err.value) == f"{path}: stage 0: key updates: Value 'ten' of type 'str' could not be converted to Integer"


def test_a_layer_plan_predicts_its_bits_and_bytes_as_the_paper_counts():
    from quant_noise_plugin.schedule import LayerPlan

    plan = LayerPlan(["fc"], "Linear", [64, 96], 8, 256)  # 768 blocks of 8 bits, 256 x 8 fp16 centroids
    assert plan.n_weights == 6144 and plan.bits_per_weight == 1.0
    assert (plan.objective, plan.reassign_every) == ("weights", 0)  # the paper's: codes frozen once fitted
    assert plan.compressed_bytes == 768 + 256 * 8 * 2
    plan = LayerPlan(["fc"], "Linear", [64, 96], 4, 32)  # 1536 blocks of 5 bits, 32 x 4 fp16 centroids
    assert plan.bits_per_weight == 1.25 and plan.compressed_bytes == 1536 * 5 / 8 + 32 * 4 * 2
    plan = LayerPlan(["embed", "out"], "Embedding", [61, 96], 8, 32)  # 732 blocks of 5 bits: 457.5 bytes, counted as such
    assert plan.compressed_bytes == 457.5 + 32 * 8 * 2 and plan.name == "embed"


class SharedAndTied(nn.Module):
    """One Linear registered under two names (a layer used twice), an embedding tied to an output Linear, an LM
    head that reads the embedding's Parameter as its ``weight`` (RoBERTa's), and a plain module holding a Parameter
    of its own named ``weight`` (no Linear/Embedding uses it)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Linear(16, 16)
        self.again = self.block
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight
        self.head = nn.Module()
        self.head.weight = self.embed.weight
        self.scale = nn.Module()
        self.scale.weight = nn.Parameter(torch.ones(16, 16))


def test_tied_and_shared_weights_group_every_name_that_uses_them_once():
    from quant_noise_plugin.schedule import quantizable_weights

    model = SharedAndTied()
    groups = sorted(quantizable_weights(model).values())
    assert groups == [["block", "again"], ["embed", "out", "head"]]
    plan = plan_schedule(load_schedule_text("defaults:\n  Linear: {block_size: 4, n_centroids: 4}\n  Embedding: {block_size: 4, n_centroids: 4}\n"
                                            "stages:\n  - {name: all, layers: 'again|out', updates: 1}\n"), model)
    assert [layer.names for layer in plan[0].layers] == [["embed", "out", "head"], ["block", "again"]]
    assert [layer.kind for layer in plan[0].layers] == ["Embedding", "Linear"]
    two_stages = load_schedule_text("defaults:\n  Embedding: {block_size: 4, n_centroids: 4}\nstages:\n"
                                    "  - {name: a, layers: 'embed', updates: 1}\n  - {name: b, layers: 'head|out', updates: 1}\n")
    with pytest.raises(ScheduleError, match=r"stage 1 \(b\): layer embed is already quantized by stage a"):
        plan_schedule(two_stages, model)
    too_big = load_schedule_text("defaults:\n  Embedding: {block_size: 4, n_centroids: 1024}\nstages:\n  - {name: a, layers: 'out', updates: 1}\n")
    with pytest.raises(ScheduleError, match=r"stage 0 \(a\): layer embed \(shape \(50, 16\)\): n_centroids 1024 but only 200 blocks"):
        plan_schedule(too_big, model)


def load_schedule_text(text):
    from omegaconf import OmegaConf

    from quant_noise_plugin.schedule import schedule_from_dict

    return schedule_from_dict(OmegaConf.create(text))
