"""The size/quality frontier (results/frontier_lm.*): records in the issue's shape, panels that survive
each other's reruns, a verdict that needs every seed, and one real run through fairseq on the tiny slice."""
import json
import shutil
import sys

from conftest import REPO, run

sys.path.insert(0, str(REPO / "scripts"))
from experiments.frontier import FIELDS, METRICS, as_cell, frontier_records, means_at, merged, render_panel, verdict  # noqa: E402


def cell(mode, column, seed, ppl, size):
    return {"task": "lm", "mode": mode, "column": column, "seed": seed, "ppl": ppl, "valid_ppl": ppl - 1, "bytes": size,
            "command": "test"}


def test_records_ratio_merge_and_verdict():
    cells = [cell("none", "fp32", 1, 40.0, 8000), cell("none", "ipq_x50", 1, 60.0, 160),
             cell("qn", "fp32", 1, 44.0, 8000), cell("qn", "ipq_x50", 1, 55.0, 200)]
    records = frontier_records(cells, "annealed")
    assert all(set(FIELDS) <= set(r) for r in records)
    x50 = {r["recipe"]: r for r in records if r["point"] == "ipq_x50"}
    assert x50["none"]["ratio"] == 50.0 and x50["qn"]["ratio"] == 40.0 and x50["qn"]["test_ppl"] == 55.0
    quick = [dict(r, preset="quick") for r in records]
    both = merged(quick, records)
    assert len(both) == 8
    x50_none = next(r for r in records if r["recipe"] == "none" and r["point"] == "ipq_x50")
    again = merged(both, [dict(x50_none, test_ppl=1.0)])  # a rerun replaces its own records only
    assert len(again) == 8 and [r["test_ppl"] for r in again if r["test_ppl"] == 1.0] == [1.0]
    fp32_none = next(r for r in records if r["recipe"] == "none" and r["point"] == "fp32")
    assert len(merged(both, [dict(fp32_none)])) == 8  # the same model's fp32 again: its other points stay
    # the row retrained (its fp32 scores otherwise): its stored points came from the earlier model and go
    retrained = merged(both, [dict(fp32_none, test_ppl=39.0, valid_ppl=38.0)])
    assert sorted((r["preset"], r["recipe"], r["point"]) for r in retrained if r["recipe"] == "none") == [
        ("annealed", "none", "fp32"), ("quick", "none", "fp32"), ("quick", "none", "ipq_x50")]
    assert len(retrained) == 7

    def recs(recipe, *ppls):
        return [{"recipe": recipe, "seed": i + 1, "test_ppl": p, "valid_ppl": p} for i, p in enumerate(ppls)]

    baselines = {"none": recs("none", 60.0, 61.0), "qat_int4": recs("qat_int4", 62.0, 63.0)}
    assert "noise wins: qn" in verdict({**baselines, "qn": recs("qn", 58.0, 59.0)})
    assert "no noise recipe beats" in verdict({**baselines, "qn": recs("qn", 58.0, 60.5)})  # a seed inside the spread
    assert "a screen, no verdict" in verdict({**baselines, "qn": recs("qn", 50.0)})  # one seed is a screen, not a result
    assert "no noise recipe beats" in verdict({**baselines, "qn": recs("qn", 50.0), "qn2": recs("qn2", 58.0, 60.5)})
    assert "a baseline is missing" in verdict({"none": baselines["none"], "qn": recs("qn", 50.0, 50.0)})
    assert verdict({**baselines, "qn": recs("qn", 58.0, 59.0)}).startswith("chosen on valid: qn")


def test_small_dense_rows_get_their_own_table_and_the_compress_or_train_small_reading():
    """small_d* rows stay out of the recipe columns; each point of the panel is compared with the small point chosen
    on valid among those of no more bytes (a smaller model's fp32 point can be the better buy)."""
    cells = [cell("none", "fp32", 1, 40.0, 8000), cell("none", "ipq_x50", 1, 60.0, 160), cell("none", "int4", 1, 41.0, 1100),
             cell("small_d16", "fp32", 1, 70.0, 900), cell("small_d16", "int4", 1, 72.0, 150),
             cell("small_d16_lr3e-3", "int4", 1, 50.0, 150), cell("small_d16_lr3e-3", "int2", 1, 90.0, 80)]
    text = render_panel(frontier_records(cells, "annealed"), "annealed", "doc")
    header = text.splitlines()[4]
    assert "`none`" in header and "small_d" not in header
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ") and "MB |" in line}
    assert "`small_d16_lr3e-3` int4 (0.000 MB) 50.00 | small model better" in rows["ipq_x50"]  # 150 <= 160 bytes, valid 49 chosen
    assert "`small_d16_lr3e-3` int4 (0.000 MB) 50.00 | compressed better" in rows["int4"]  # chosen on valid, not the 900-byte fp32
    assert "| `small_d16_lr3e-3` | int2 | 0.000 MB | 90.00 [valid 89.00] |" in text

    """The classifier's records carry accuracy (valid_acc, test_acc), read back as cls cells, and its verdict
    and choice on valid go the other way from perplexity's: a noise recipe wins with every seed above both baselines."""
    cells = [{"task": "cls", "mode": m, "column": c, "seed": 1, "acc": a, "valid_acc": a + 1, "bytes": b, "command": "test"}
             for m, c, a, b in (("none", "fp32", 55.0, 8000), ("none", "ipq_x50", 50.0, 200), ("qn", "ipq_x50", 52.0, 200))]
    records = frontier_records(cells + [cell("none", "fp32", 1, 40.0, 9000)], "annealed", "cls")
    assert [r["test_acc"] for r in records] == [55.0, 50.0, 52.0] and "test_ppl" not in records[0]
    assert records[1]["ratio"] == 40.0 and as_cell(records[2])["task"] == "cls" and as_cell(records[2])["acc"] == 52.0

    def recs(recipe, *accs):
        return [{"recipe": recipe, "seed": i + 1, "test_acc": a, "valid_acc": a} for i, a in enumerate(accs)]

    acc = METRICS["cls"]
    baselines = {"none": recs("none", 50.0, 51.0), "qat_int4": recs("qat_int4", 49.0, 52.0)}
    assert verdict({**baselines, "qn": recs("qn", 53.0, 54.0)}, acc) == "chosen on valid: qn; noise wins: qn"
    assert "no noise recipe beats" in verdict({**baselines, "qn": recs("qn", 51.5, 60.0)}, acc)  # a seed inside the spread
    assert verdict({**baselines, "qn": recs("qn", 40.0, 41.0)}, acc).startswith("chosen on valid: none")


def test_means_at_one_point_of_one_panel():
    """What the demo prints beside its own numbers: each recipe's mean over its seeds, this preset and point only."""
    cells = [cell("none", "ipq_x50", 1, 60.0, 160), cell("none", "ipq_x50", 2, 64.0, 160), cell("qn", "ipq_x50", 1, 55.0, 200),
             cell("qn", "fp32", 1, 44.0, 8000)]
    records = frontier_records(cells, "annealed") + [dict(r, preset="quick", test_ppl=1.0) for r in frontier_records(cells, "x")]
    assert means_at(records, "annealed", "ipq_x50") == {"none": (62.0, 2), "qn": (55.0, 1)}
    assert means_at(records, "annealed", "int2") == {} and means_at(records, "smoke", "ipq_x50") == {}


def test_stored_records_fill_only_their_own_presets_cells(tmp_path):
    """--render-only reads stored records by preset (their own key, else their command's --preset): a quick
    record never fills a full-preset cell; frontier records read back as cells; a seedless record is seed 1."""
    from experiments.cache import Cells
    from reproduce import stored_cells

    quick = dict(cell("none", "fp32", 1, 60.0, 8000), command="scripts/reproduce.py --preset quick")
    full = {k: v for k, v in cell("none", "fp32", 1, 35.0, 8000).items() if k != "seed"} | {"command": "scripts/reproduce.py --lm-modes none"}
    (tmp_path / "a.json").write_text(json.dumps([quick, full]))
    (tmp_path / "f.json").write_text(json.dumps(frontier_records([dict(cell("qn", "int2", 2, 80.0, 700))], "annealed")))
    key = ("lm", "none", "fp32", 1)
    assert Cells(tmp_path, stored_cells([tmp_path / "a.json"]), "quick").fallback[key]["ppl"] == 60.0
    assert Cells(tmp_path, stored_cells([tmp_path / "a.json"]), "full").fallback[key]["ppl"] == 35.0  # no --preset: the default
    annealed = Cells(tmp_path, stored_cells([tmp_path / "a.json", tmp_path / "f.json", tmp_path / "missing.json"]), "annealed").fallback
    assert list(annealed) == [("lm", "qn", "int2", 2)] and annealed[("lm", "qn", "int2", 2)]["ppl"] == 80.0
    assert frontier_records([full, dict(full, column="int4", bytes=2000)], "full")[1]["ratio"] == 4.0


def test_frontier_through_fairseq_keep_best(tiny_data, tmp_path):
    """A keep_best preset on the tiny slice: fairseq takes the flags, checkpoint_best is compressed, and the
    frontier's three files are written; a render-only rerun of another preset keeps this panel."""
    grid = tmp_path / "grid"
    shutil.copytree(REPO / "configs/experiments", grid)
    text = (grid / "presets.yaml").read_text()
    text = text.replace("    updates: 3\n    schedules:\n      ipq: configs/ipq/smoke/all_layers.yaml",
                        "    updates: 6\n    lr_scheduler: polynomial_decay\n    keep_best: true\n    patience: 1\n"
                        "    schedules:\n      ipq: configs/ipq/smoke/all_layers.yaml", 1)
    (grid / "presets.yaml").write_text(text)
    out = tmp_path / "results"
    cmd = [sys.executable, REPO / "scripts/reproduce.py", "--grid", grid, "--preset", "smoke", "--table", "frontier", "--data", tiny_data,
           "--work", tmp_path / "work", "--results", out, "--lm-modes", "none", "--lm-columns", "fp32", "int2", "ipq"]
    log = run(cmd).output
    assert "--lr-scheduler polynomial_decay" in log and "checkpoint_best.pt" in log
    records = json.loads((out / "frontier_lm.json").read_text())
    assert [(r["preset"], r["recipe"], r["point"]) for r in records] == [("smoke", "none", p) for p in ("fp32", "int2", "ipq")]
    assert records[0]["ratio"] == 1.0 and records[1]["ratio"] > 4 and all(r["test_ppl"] > 1 and r["valid_ppl"] > 1 for r in records)
    assert (out / "frontier_lm.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "frontier_lm.md").read_text()
    assert "## Preset `smoke`" in table and "checkpoint_best on valid" in table and str(tmp_path) not in table

    shutil.copy(REPO / "results/ablation_noise.json", out / "ablation_noise.json")
    quick = run([sys.executable, REPO / "scripts/reproduce.py", "--grid", grid, "--experiment", "frontier_quick", "--seeds", "1", "2",
                 "--work", tmp_path / "empty", "--results", out, "--render-only"]).output
    assert "[cached] lm none_long ipq_k1024 seed 2" in quick and "[missing] lm qat_int4_long" not in quick
    presets = {r["preset"] for r in json.loads((out / "frontier_lm.json").read_text())}
    assert presets == {"smoke", "quick"} and "## Preset `quick`" in (out / "frontier_lm.md").read_text()
