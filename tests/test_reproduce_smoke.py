"""The reproduction pipeline end to end on the tiny slice: cells computed, cached, rendered, plotted."""
import json
import sys

from conftest import REPO, run


def test_reproduce_smoke_grid(tiny_data, tmp_path):
    cmd = [sys.executable, REPO / "scripts/reproduce.py", "--preset", "smoke", "--data", tiny_data, "--work", tmp_path / "work",
           "--results", tmp_path / "results", "--lm-modes", "qn_pq_0.1", "--lm-columns", "fp32", "ipq", "--mt-modes", "none", "--mt-columns", "int8"]
    first = run(cmd).output
    assert "fairseq-train" in first and "ipq_language_modeling" in first
    cells = json.loads((tmp_path / "results/reproduce.json").read_text())
    assert [(c["task"], c["mode"], c["column"]) for c in cells] == [("lm", "qn_pq_0.1", "fp32"), ("lm", "qn_pq_0.1", "ipq"), ("mt", "none", "int8")]
    lm = {c["column"]: c for c in cells if c["task"] == "lm"}
    assert all(c["ppl"] > 1 for c in lm.values())
    assert lm["ipq"]["bytes"] < lm["fp32"]["bytes"]  # real files, really smaller
    assert (tmp_path / "work" / lm["ipq"]["checkpoint"]).stat().st_size == lm["ipq"]["bytes"]
    assert cells[2]["bleu"] >= 0
    table = (tmp_path / "results/lm_kjv.md").read_text()
    assert f"{lm['ipq']['ppl']:.2f}" in table and "qn_pq_0.1" in table and "Command:" in table
    assert "BLEU" in (tmp_path / "results/mt_en_es.md").read_text()
    png = (tmp_path / "results/size_vs_quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    second = run(cmd).output  # everything cached: no training, no evaluation
    assert second.count("[cached]") == 3
    assert not [line for line in second.splitlines() if line.startswith("$ ")]  # no command was run
    assert json.loads((tmp_path / "results/reproduce.json").read_text()) == cells
