"""The reproduction pipeline end to end on the tiny slice: cells computed, cached, rendered, plotted."""
import json
import shutil
import sys

import torch

from conftest import REPO, run


def test_reproduce_smoke_grid(tiny_data, tmp_path):
    cmd = [sys.executable, REPO / "scripts/reproduce.py", "--preset", "smoke", "--data", tiny_data, "--work", tmp_path / "work",
           "--results", tmp_path / "results", "--lm-modes", "qn_pq_0.1", "--lm-columns", "fp32", "ipq", "ipq+w8a8", "--mt-modes", "--cls-modes"]
    first = run(cmd).output
    assert "fairseq-train" in first and "ipq_language_modeling" in first
    cells = json.loads((tmp_path / "results/reproduce.json").read_text())
    assert [(c["task"], c["mode"], c["column"]) for c in cells] == [
        ("lm", "qn_pq_0.1", "fp32"), ("lm", "qn_pq_0.1", "ipq"), ("lm", "qn_pq_0.1", "ipq+w8a8")]
    lm = {c["column"]: c for c in cells if c["task"] == "lm"}
    assert all(c["ppl"] > 1 and c["valid_ppl"] > 1 for c in lm.values())
    assert lm["ipq"]["bytes"] < lm["fp32"]["bytes"]  # real files, really smaller
    assert abs(lm["ipq+w8a8"]["ppl"] / lm["ipq"]["ppl"] - 1) < 0.05  # int8 activations on top of iPQ
    w8a8 = torch.load(tmp_path / "work" / lm["ipq+w8a8"]["checkpoint"], weights_only=True)
    assert w8a8["quant_noise"]["activation_bits"] == 8
    assert (tmp_path / "work" / lm["ipq"]["checkpoint"]).stat().st_size == lm["ipq"]["bytes"]
    table = (tmp_path / "results/lm_kjv.md").read_text()
    assert f"{lm['ipq']['ppl']:.2f}" in table and "qn_pq_0.1" in table and "Command:" in table
    png = (tmp_path / "results/size_vs_quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    second = run(cmd).output  # everything cached: no training, no evaluation
    assert second.count("[cached]") == 3
    assert not [line for line in second.splitlines() if line.startswith("$ ")]  # no command was run
    assert json.loads((tmp_path / "results/reproduce.json").read_text()) == cells
    assert all(c["device"] == "cpu" and c["command"].startswith("scripts/reproduce.py --preset smoke") for c in cells)
    assert "- cpu, commit " in table and "`scripts/reproduce.py --preset smoke" in table  # provenance of the cells
    assert str(tmp_path) not in table and str(tiny_data) not in table and "--data .../tiny" in table  # no machine's path
    assert table.rstrip().splitlines()[-1].startswith("Command: `scripts/reproduce.py --preset smoke") and "(commit " in table

    # the cells survive without the cache: --render-only over an empty --work re-renders the same tables from the
    # results folder's own reproduce.json (how the shipped tables are re-rendered on any machine)
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "results", shipped)
    again = [str(c) for c in cmd]
    again[again.index("--work") + 1], again[again.index("--results") + 1] = str(tmp_path / "empty"), str(shipped)
    out = run(again + ["--render-only"]).output
    assert out.count("[cached]") == 3 and not [line for line in out.splitlines() if line.startswith("$ ")]
    for name in ("lm_kjv.md",):
        before, after = ((d / name).read_text().split("\nCommand:")[0] for d in (tmp_path / "results", shipped))
        assert before == after
    assert json.loads((shipped / "reproduce.json").read_text()) == cells

    # --render-only: tables from cached cells (e.g. computed on another machine), nothing computed, gaps shown
    rendered = tmp_path / "rendered"
    only = [str(c) for c in cmd]
    only[only.index("--results") + 1] = str(rendered)
    only[only.index("--lm-modes") + 1:only.index("--lm-modes") + 2] = ["qn_pq_0.1", "none"]
    third = run(only + ["--render-only"]).output
    assert third.count("[cached]") == 3 and "[missing] lm none fp32" in third
    assert not [line for line in third.splitlines() if line.startswith("$ ")]
    rows = {line.split("|")[1].strip(): line for line in (rendered / "lm_kjv.md").read_text().splitlines() if line.startswith("| ")}
    assert f"{lm['ipq']['ppl']:.2f}" in rows["qn_pq_0.1"] and rows["none"].count("–") == 3

    # another schedule is another iPQ cell (and file); the fp32 cell and the dense training are reused
    schedule = tmp_path / "other.yaml"
    schedule.write_text("defaults:\n  Linear: {block_size: 4, n_centroids: 4}\n  Embedding: {block_size: 4, n_centroids: 4}\n"
                        "stages:\n  - {name: ffn, layers: 'decoder\\.layers\\.\\d+\\.fc[12]', updates: 2}\n")
    other = [str(c) for c in cmd[:cmd.index("--lm-columns") + 1]] + ["fp32", "ipq", "--mt-modes", "--cls-modes", "--lm-schedule", str(schedule)]
    fourth = run(other).output
    assert "[cached] lm qn_pq_0.1 fp32" in fourth and "[cached] lm qn_pq_0.1 ipq" not in fourth
    assert "--task language_modeling" not in fourth  # no dense retraining
    new_ipq = {c["column"]: c for c in json.loads((tmp_path / "results/reproduce.json").read_text())}["ipq"]
    assert new_ipq["checkpoint"] != lm["ipq"]["checkpoint"] and new_ipq["bytes"] != lm["ipq"]["bytes"]
    assert "other.yaml" in (tmp_path / "results/lm_kjv.md").read_text()
    assert "no such file" in run(other[:-1] + [str(tmp_path / "missing.yaml")], check=False).output
    schedule.write_text(schedule.read_text().replace("n_centroids: 4}", "n_centroids: 2}"))  # edited in place, same path
    fifth = run(other).output
    assert "[cached] lm qn_pq_0.1 fp32" in fifth and "[cached] lm qn_pq_0.1 ipq" not in fifth
    edited = {c["column"]: c for c in json.loads((tmp_path / "results/reproduce.json").read_text())}["ipq"]
    assert edited["checkpoint"] not in (new_ipq["checkpoint"], lm["ipq"]["checkpoint"])
    schedule.write_text("stages:\n  - {name: ffn, layers: 'decoder\\.layers\\.\\d+\\.fc[12]', updates: 2, colour: red}\n")
    bad = run(other, check=False)
    assert bad.returncode == 2 and "--lm-schedule" in bad.output and "colour" in bad.output and "Traceback" not in bad.output


def test_reproduce_smoke_translation(tiny_data, tmp_path):
    """The translation table's cell (its own test: the grid test above is the suite's longest)."""
    cmd = [sys.executable, REPO / "scripts/reproduce.py", "--preset", "smoke", "--data", tiny_data, "--work", tmp_path / "work",
           "--results", tmp_path / "results", "--lm-modes", "--mt-modes", "none", "--mt-columns", "w8a8", "--cls-modes"]
    run(cmd)
    (cell,) = json.loads((tmp_path / "results/reproduce.json").read_text())
    assert (cell["task"], cell["mode"], cell["column"]) == ("mt", "none", "w8a8")
    assert cell["bleu"] >= 0 and "input_quant" in str(list(torch.load(tmp_path / "work" / cell["checkpoint"], weights_only=True)["model"]))
    assert "BLEU" in (tmp_path / "results/mt_en_es.md").read_text()
    assert run(cmd).output.count("[cached]") == 1


def test_reproduce_smoke_classifier(tiny_data, tmp_path):
    cmd = [sys.executable, REPO / "scripts/reproduce.py", "--preset", "smoke", "--data", tiny_data, "--work", tmp_path / "work",
           "--results", tmp_path / "results", "--lm-modes", "--mt-modes", "--cls-modes", "none", "--cls-columns", "fp32", "ipq"]
    out = run(cmd).output
    assert "--task masked_lm" in out and "--task sentence_prediction" in out and "--task ipq_sentence_prediction" in out
    cells = json.loads((tmp_path / "results/reproduce.json").read_text())
    assert [(c["task"], c["column"]) for c in cells] == [("cls", "fp32"), ("cls", "ipq")]
    assert all(0 < c["acc"] < 100 and 0 < c["valid_acc"] < 100 for c in cells)
    assert cells[1]["bytes"] < cells[0]["bytes"]
    table = (tmp_path / "results/cls_kjv_pairs.md").read_text()
    assert "Baselines on the same test split: majority class 33.3%" in table and f"{cells[1]['acc']:.2f}" in table
    assert "masked-LM pretraining updates" in table

    # the same cells as the encoder's frontier (records of accuracy, the baselines under the title), from the cache
    run(cmd + ["--table", "frontier", "--render-only"])
    records = json.loads((tmp_path / "results/frontier_cls.json").read_text())
    assert [(r["recipe"], r["point"], r["test_acc"]) for r in records] == [("none", c["column"], c["acc"]) for c in cells]
    assert records[1]["ratio"] > 1 and not (tmp_path / "results/frontier_lm.json").exists()
    frontier = (tmp_path / "results/frontier_cls.md").read_text()
    assert frontier.startswith("# The encoder's size/quality frontier") and "bag-of-words" in frontier and "Test acc" in frontier
    assert (tmp_path / "results/frontier_cls.png").read_bytes()[:4] == b"\x89PNG"


def test_ablation_table_seeds_and_equal_budget_control(tmp_path):
    """The ablation table: each row's seeds, means with each seed's value, and iPQ's cost against the dense
    control only for rows whose training + iPQ equals the control's training (longer rows show '–')."""
    sys.path.insert(0, str(REPO / "scripts"))
    from experiments.ablation import render_ablation
    from experiments.grid import load_grid
    from experiments.runs import Runner

    runner = Runner(load_grid(), "smoke", 1, tmp_path / "work", tmp_path)

    def cell(mode, column, seed, ppl):
        return {"task": "lm", "mode": mode, "column": column, "seed": seed, "ppl": ppl, "valid_ppl": ppl - 1,
                "device": "cpu", "command": "test"}

    results = [cell("none_long", "fp32", 1, 40.0), cell("none_long", "fp32", 2, 42.0),
               cell("none", "fp32", 1, 50.0), cell("none", "ipq_k1024", 1, 55.0),
               cell("qn_pq_0.1_late_long", "fp32", 1, 44.0), cell("qn_pq_0.1_late_long", "ipq_k1024", 1, 48.0)]
    text = render_ablation(results, "lm", ["none", "none_long", "qn_pq_0.1_late_long"], ["fp32", "ipq_k1024"], runner, [1, 2], "test")
    test_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                 for line in text.split("### Test split")[1].splitlines() if line.startswith("| ") and "mode" not in line}
    assert test_rows["none_long"][1:3] == ["1, 2", "41.00 (40.00 / 42.00)"]
    assert test_rows["none"][1] == "1" and test_rows["none"][-1] == f"{100 * (55 / 41 - 1):+.1f}%"  # 55 against the mean of 40 and 42
    assert test_rows["qn_pq_0.1_late_long"][-1] == "–"  # trained longer than the control: no equal-budget comparison
