"""A new user's first hour: no silent wrong number, a working hub, errors in one line, sane files."""
import os
import stat
import sys

import pytest

from conftest import PLUGIN, ipq_train, run, train_lm


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def test_eval_lm_refuses_blocks_longer_than_the_model_and_evaluates_with_the_readme_flags(lm_data, dense_lm):
    # the model was trained with --tokens-per-sample 64; eval-lm's default is 1024
    bare = run(["fairseq-eval-lm", lm_data, "--user-dir", PLUGIN, "--path", dense_lm, "--cpu"], check=False)
    assert bare.returncode != 0
    assert "Perplexity: 1.00" not in bare.output and "Traceback" not in bare.output
    assert last_line(bare.output).startswith("fairseq-eval-lm: error: --tokens-per-sample 1024 is longer than the model's 64 positions")
    assert "pass --tokens-per-sample 64" in last_line(bare.output)
    for flags, message in ((["--tokens-per-sample", "128", "--context-window", "64"], "--tokens-per-sample 128 is longer than the model's 64"),
                           (["--tokens-per-sample", "64", "--context-window", "64"], "--context-window 64 leaves no new token")):
        result = run(["fairseq-eval-lm", lm_data, "--user-dir", PLUGIN, "--path", dense_lm, "--cpu", *flags], check=False)
        assert result.returncode != 0 and message in last_line(result.output)
    good = run(["fairseq-eval-lm", lm_data, "--user-dir", PLUGIN, "--path", dense_lm, "--cpu", "--tokens-per-sample", "64",
                "--context-window", "32"])
    evaluated = int(good.output.split("Evaluated ")[1].split()[0].replace(",", ""))
    assert evaluated > 1000


HUB = """
import sys
from fairseq.models.transformer_lm import TransformerLanguageModel
hub = TransformerLanguageModel.from_pretrained(sys.argv[1], sys.argv[2], data_name_or_path=sys.argv[3], user_dir=sys.argv[4])
scored = hub.score("And God said , Let there be light")
print("score", len(scored["tokens"]), float(scored["positional_scores"].mean()))
print("sample", repr(hub.sample("In the beginning", sampling=True, sampling_topk=10, min_len=6, max_len_b=6, seed=1)))  # min_len counts the 3 prompt tokens
hypos = hub.generate(hub.encode("And God said"), beam=2, max_len_b=4)
print("generate", len(hypos), float(hypos[0]["score"]))
# token-by-token greedy generation from the PQ codes (QUANT_NOISE_INFERENCE=codes) against the decoded weights; this
# model's layers are too small for the tables to measure faster, so they are made to run on every call of <= 64 rows
import os
from quant_noise_plugin import inference, lut
inference.measured_lut_rows = lambda *args: 64
calls, lut_linear = [], lut.lut_linear
lut.lut_linear = lambda *args: calls.append(1) or lut_linear(*args)
greedy = {}
for mode in ("decoded", "codes"):
    os.environ["QUANT_NOISE_INFERENCE"] = mode
    greedy[mode] = [hub.generate(hub.encode(p), beam=1, max_len_b=12, min_len=12)[0]["tokens"].tolist()
                    for p in ("And God said", "In the beginning", "And the LORD spake")]
print("greedy", greedy["codes"] == greedy["decoded"], len(greedy["codes"][0]), len(calls))
"""


@pytest.mark.parametrize("form", ["ipq", "packed"])
def test_hub_score_sample_and_generate_on_a_compressed_checkpoint(ipq, lm_data, tmp_path, form):
    save, _ = ipq
    path = save / "checkpoint_last.pt"
    if form == "packed":
        path = tmp_path / "packed.pt"
        run(["quant-noise", "pack", save / "checkpoint_last.pt", path, "--scalar-bits", "8"])
    out = run([sys.executable, "-c", HUB, path.parent, path.name, lm_data, PLUGIN]).output
    score = [line for line in out.splitlines() if line.startswith("score ")][0].split()
    assert int(score[1]) == 8 and -12 < float(score[2]) < 0  # the 8 tokens, real log-probabilities
    sample = [line for line in out.splitlines() if line.startswith("sample ")][0]
    assert sample.startswith("sample 'In the beginning ") and len(sample.split()) >= 6
    assert [line for line in out.splitlines() if line.startswith("generate 2 ")]
    greedy = [line for line in out.splitlines() if line.startswith("greedy ")][0].split()
    assert greedy[1] == "True" and int(greedy[2]) == 13 and int(greedy[3]) > 100  # same top-1 tokens (12 and </s>); the tables ran
    assert "pin_memory" not in out  # the plugin drops torch's pinned-memory warning on a machine without a GPU


def test_bad_schedule_through_fairseq_train_is_one_line(lm_data, dense_lm, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: ffn, layers: 'decoder\\.nothing', updates: 2}\n")
    result = ipq_train(lm_data, tmp_path / "run", dense_lm, bad, check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert last_line(result.output).startswith(f"fairseq-train: error: {bad}: stage 0 (ffn): key layers: regex")


def test_truncated_checkpoint_in_eval_lm_is_one_line(lm_data, dense_lm, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(dense_lm.read_bytes()[:100_000])
    result = run(["fairseq-eval-lm", lm_data, "--user-dir", PLUGIN, "--path", broken, "--cpu", "--tokens-per-sample", "64"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert last_line(result.output) == (f"fairseq-eval-lm: error: {broken}: not a readable torch checkpoint (PytorchStreamReader failed "
                                        f"reading zip archive: failed finding central directory): the file is truncated or corrupted; "
                                        f"re-create or re-copy it")


def test_stock_transformer_lm_of_another_width_finetunes_in_the_plugin_arch(lm_data, tmp_path):
    """transformer_lm keeps 512-wide input/output dims at any width; the README's flags make the plugin arch match."""
    width = ["--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2"]
    train_lm(lm_data, tmp_path / "stock", "--arch", "transformer_lm", *width, max_update=2)
    stock = tmp_path / "stock" / "checkpoint_last.pt"
    plain = train_lm(lm_data, tmp_path / "plain", "--arch", "qn_transformer_lm", *width, "--finetune-from-model", stock, max_update=3, check=False)
    assert plain.returncode != 0 and "Traceback" not in plain.output
    assert "pass --decoder-input-dim 512 --decoder-output-dim 512" in last_line(plain.output)
    tuned = train_lm(lm_data, tmp_path / "tuned", "--arch", "qn_transformer_lm", *width, "--decoder-input-dim", "512",
                     "--decoder-output-dim", "512", "--finetune-from-model", stock, "--quant-noise-pq", "0.1", max_update=3)
    assert "loaded checkpoint" in tuned.output.lower() and "done training" in tuned.output


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_checkpoints_follow_the_umask(ipq, tmp_path, umask, mode):
    save, _ = ipq
    for command, name in (("pack", "packed.pt"), ("unpack", "dense.pt")):
        run(["quant-noise", command, save / "checkpoint_last.pt", tmp_path / name], preexec_fn=lambda: os.umask(umask))
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_size_of_an_uncompressed_checkpoint_says_it_is_fp16_only(dense_lm):
    out = run(["quant-noise", "size", dense_lm]).output
    assert "fp16 size (no layer is quantized)" in out and "compressed size" not in out
    assert "from fp16 storage alone" in out


def test_ipq_run_logs_no_faiss_loader_noise(ipq):
    _, output = ipq
    assert "k-means objective" in output  # faiss ran
    assert "swigfaiss" not in output and "ModuleNotFoundError" not in output
