"""Schedule YAML parsing and validation against a model."""
from pathlib import Path

import pytest
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
