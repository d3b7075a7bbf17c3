"""The experiment grid as data (configs/experiments/*.yaml): validated at start in one line, and one
runner behind the demo and the reproduction."""
import shutil
import sys

import pytest

from conftest import REPO, run

sys.path.insert(0, str(REPO / "scripts"))
from experiments.grid import GridError, load_grid  # noqa: E402
from experiments.runs import Runner  # noqa: E402

GRID = REPO / "configs" / "experiments"


def broken_grid(tmp_path, file, old, new):
    folder = tmp_path / "grid"
    shutil.copytree(GRID, folder)
    text = (folder / file).read_text()
    assert old in text
    (folder / file).write_text(text.replace(old, new, 1))
    return folder


@pytest.mark.parametrize("file, old, new, culprit", [
    ("lm.yaml", "  qn_pq_0.2:\n", "  qn_pq_0.2:\n    colour: red\n", "lm.yaml: modes.qn_pq_0.2: key colour"),
    ("lm.yaml", '    flags: [--quant-noise-pq, "0.2"]', "    flags: --quant-noise-pq", "lm.yaml: modes.qn_pq_0.2: key flags"),
    ("lm.yaml", "    base: none\n    updates: 33%", "    base: nothing\n    updates: 33%", "lm.yaml: modes.ft_none: key base"),
    ("lm.yaml", "    updates: 33%", "    updates: a third", "lm.yaml: modes.ft_none: key updates"),
    ("mt.yaml", "    modes: [none, qn_pq_0.1]", "    modes: [none, qn_pq_9]", "mt.yaml: tables.grid: unknown mode 'qn_pq_9'"),
    ("presets.yaml", "    updates: 600\n", "    updates: six hundred\n", "presets.yaml: quick: key lm.updates"),
    ("presets.yaml", "configs/ipq/qn_transformer_demo.yaml", "configs/ipq/missing.yaml", "quick.mt.schedules.ipq: no such file"),
    ("columns.yaml", "  after_ipq: false", "  after_ipq: sometimes", "columns.yaml: int4: key after_ipq"),
    ("experiments.yaml", "modes: [qn_centroids_k16_0.1_kd]", "modes: [qn_pq_7]", "experiments.yaml: demo: unknown mode 'qn_pq_7'"),
    ("presets.yaml", "    lr_scheduler: polynomial_decay\n", "    lr_scheduler: cosine\n", "presets.yaml: annealed.lm.lr_scheduler: 'cosine'"),
    ("presets.yaml", "    keep_best: true\n", "    keep_best: false\n", "presets.yaml: annealed.lm.patience: needs keep_best: true"),
])
def test_malformed_grid_fails_in_one_line_naming_the_culprit(tmp_path, file, old, new, culprit):
    folder = broken_grid(tmp_path, file, old, new)
    with pytest.raises(GridError, match=culprit.replace(".", r"\.").replace("[", r"\[")):
        load_grid(folder)
    result = run([sys.executable, REPO / "scripts/reproduce.py", "--grid", folder, "--render-only"], check=False)
    assert result.returncode != 0 and culprit in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error" in line]) == 1


def test_shipped_grid_loads_and_help_lists_it():
    grid = load_grid()
    assert {"full", "quick", "smoke"} <= set(grid.presets) and "demo" in grid.experiments
    out = run([sys.executable, REPO / "scripts/reproduce.py", "--help"]).output
    assert "qn_centroids_0.1_late_long" in out and "smoke: tests" in out and "demo:" in out


def test_a_row_is_a_yaml_edit(tmp_path):
    """A new row (flags with {N%}, a finetuning base) appears in --help and builds its commands, no code touched."""
    folder = broken_grid(tmp_path, "lm.yaml", "modes:\n", "modes:\n  my_row:\n    doc: mine\n    flags: [--quant-noise-pq, '0.1', "
                         "--quant-noise-start-update, '{50%}']\n    base: none\n    updates: 50%\n")
    grid = load_grid(folder)
    runner = Runner(grid, "quick", 1, tmp_path / "work", tmp_path / "data")
    cmd, save = runner.train_command("lm", "my_row")
    assert runner.budget("lm", "my_row") == 300 and runner.total_budget("lm", "my_row") == 900
    assert cmd[cmd.index("--quant-noise-start-update") + 1] == "150"
    base = runner.train_command("lm", "none")[1]
    assert cmd[cmd.index("--finetune-from-model") + 1] == base / "checkpoint_last.pt"
    assert "my_row" in run([sys.executable, REPO / "scripts/reproduce.py", "--grid", folder, "--help"]).output


def test_demo_and_its_preset_build_the_same_commands(tmp_path):
    """`make demo`'s script and the reproduction of the demo's row print the same fairseq/quant-noise command lines:
    the demo's runs are the frontier's (annealed preset, the centroid-noise row), compressed to a size by the planner."""
    common = ["--data", tmp_path / "data", "--work", tmp_path / "work", "--dry-run"]
    demo = run([sys.executable, REPO / "scripts/demo.py", *common]).output
    grid = load_grid()
    experiment = grid.experiments["demo"]
    row, columns = experiment.modes[0], experiment.columns
    reproduce = run([sys.executable, REPO / "scripts/reproduce.py", "--preset", experiment.preset, "--lm-modes", row,
                     "--lm-columns", *columns, "--mt-modes", "--cls-modes", *common]).output
    commands = [[line for line in out.splitlines() if line.startswith("$ ")] for out in (demo, reproduce)]
    assert sorted(commands[0]) == sorted(commands[1]) and len(commands[0]) == 4  # train, unpack, iPQ, pack
    train = [line for line in commands[0] if "--task language_modeling" in line][0]
    assert f"--max-update {grid.presets[experiment.preset].lm.updates}" in train and "--quant-noise-pq 0.1 --quant-noise-pq-centroids 16" in train
    assert "--lr-scheduler polynomial_decay" in train and "--patience 2" in train  # the preset's schedule, not a demo-only one
    ipq = [line for line in commands[0] if "--task ipq_language_modeling" in line][0]
    target = grid.presets[experiment.preset].lm.targets[columns[1]]
    assert f"--ipq-target-size {target}" in ipq and "--ipq-config" not in ipq and "checkpoint_best.pt" in ipq  # the planner's


def test_demo_script_end_to_end_on_the_smoke_preset(tiny_data, tmp_path):
    """`make demo`'s script, walked through on the smoke preset: every step runs, the summary is written."""
    out = run([sys.executable, REPO / "scripts/demo.py", "--preset", "smoke", "--data", tiny_data, "--work", tmp_path / "work"]).output
    assert all(f"== {i}/5" in out for i in range(1, 6)) and "fairseq-eval-lm" in out and "quant-noise schedule" in out
    summary = (tmp_path / "work" / "results" / "demo.md").read_text()
    rows = [line.split("|") for line in summary.splitlines() if line.startswith("| ") and "MB" in line]
    assert len(rows) == 3 and all(float(r[3]) > 1 for r in rows)  # dense fp32, iPQ training checkpoint, packed
    dense_mb, packed_mb = float(rows[0][2].split()[0]), float(rows[2][2].split()[0])
    assert packed_mb < dense_mb / 2 and "preset smoke" in summary
    assert "planned" in out and "ipq_plan.yaml" in out  # the iPQ run planned for its target, then ran the plan
    again = run([sys.executable, REPO / "scripts/demo.py", "--preset", "smoke", "--data", tiny_data, "--work", tmp_path / "work"]).output
    assert "--task language_modeling" not in again and "[done]" in again  # a rerun reuses the finished runs


def test_bleu_reads_every_hypothesis_of_fairseq_generate_in_any_order():
    from experiments.metrics import bleu_of_generate

    refs = ["y el dios dijo sea la luz", "en el principio creó dios los cielos y la tierra"]
    output = f"S-1\tx\nH-1\t-0.2\t{refs[1]}\nD-1\t-0.2\t{refs[1]}\nD-0\t-0.1\t{refs[0]}\n"
    assert bleu_of_generate(output, refs) == pytest.approx(100.0)
    worse = output.replace(f"D-0\t-0.1\t{refs[0]}", "D-0\t-0.1\ty el dios dijo")
    assert 0 < bleu_of_generate(worse, refs) < 100
    with pytest.raises(SystemExit, match="1 hypotheses for 2 references"):
        bleu_of_generate(f"D-1\t-0.2\t{refs[1]}\n", refs)


def test_a_users_run_never_writes_the_shipped_results(tiny_data, tmp_path):
    """Without --results, tables go under the work folder; results/ (what the docs cite) is left as it was."""
    def shipped_state():
        return run(["git", "status", "--porcelain", "--", "results"]).output, sorted(
            (p.name, p.stat().st_mtime_ns) for p in (REPO / "results").rglob("*"))

    before = shipped_state()
    run([sys.executable, REPO / "scripts/reproduce.py", "--preset", "smoke", "--lm-modes", "none", "--lm-columns", "fp32",
         "--mt-modes", "--cls-modes", "--data", tiny_data, "--work", tmp_path / "work"])
    assert (tmp_path / "work" / "results" / "lm_kjv.md").exists()
    assert shipped_state() == before


def test_accuracy_is_read_from_its_own_subsets_line():
    from experiments.metrics import accuracy_of_validate

    output = ("2026-11-29 | INFO | valid | valid on 'valid' subset | loss 1.585 | nll_loss 0 | accuracy 41.2 | wps 9\n"
              "2026-11-29 | INFO | valid | valid on 'test' subset | loss 1.602 | nll_loss 0 | accuracy 38.7 | wps 9\n")
    assert accuracy_of_validate(output, "test") == 38.7 and accuracy_of_validate(output, "valid") == 41.2
    with pytest.raises(SystemExit, match="no accuracy for the test subset"):
        accuracy_of_validate(output.splitlines()[0], "test")


def test_annealed_preset_validates_each_epoch_and_compresses_the_best_checkpoint(tmp_path):
    """keep_best: every training validates each epoch with patience, its learning rate decays to zero at the
    budget's end, and the columns, the iPQ runs and the finetuning rows all start from checkpoint_best.pt."""
    runner = Runner(load_grid(), "annealed", 1, tmp_path / "work", tmp_path / "data")
    cmd, save = runner.train_command("lm", "qn_pq_0.1")
    cmd, updates = [str(c) for c in cmd], str(runner.preset.lm.updates)
    assert cmd[cmd.index("--lr-scheduler") + 1] == "polynomial_decay" and cmd[cmd.index("--total-num-update") + 1] == updates
    assert cmd[cmd.index("--patience") + 1] == "2" and "--validate-interval-updates" not in cmd
    ipq = runner.ipq_command("lm", "qn_pq_0.1", "ipq_x50")[0]
    assert ipq[ipq.index("--finetune-from-model") + 1] == save / "checkpoint_best.pt"
    assert "--validate-interval-updates" in ipq and "--patience" not in ipq  # an iPQ run takes every update of its schedule
    assert runner.compressed_path("lm", "qn_pq_0.1", "int4")[0] == save / "checkpoint_best.pt"
    assert runner.compressed_path("lm", "qn_pq_0.1", "ipq_x50")[0].name == "checkpoint_last.pt"  # the iPQ run's end
    ft = runner.train_command("lm", "ft_qn_pq_0.1")[0]
    assert ft[ft.index("--finetune-from-model") + 1] == runner.train_command("lm", "none")[1] / "checkpoint_best.pt"
    quick = [str(c) for c in Runner(load_grid(), "quick", 1, tmp_path / "work", tmp_path / "data").train_command("lm", "none")[0]]
    assert "inverse_sqrt" in quick and "--patience" not in quick and "--validate-interval-updates" in quick
    assert "--best-checkpoint-metric" not in cmd  # the LM's best is fairseq's default, the valid loss
    cls = [str(c) for c in runner.train_command("cls", "none")[0]]  # the classifier's best and patience follow valid accuracy
    assert cls[cls.index("--best-checkpoint-metric") + 1] == "accuracy" and "--maximize-best-checkpoint-metric" in cls
    quick_cls = Runner(load_grid(), "quick", 1, tmp_path / "work", tmp_path / "data").train_command("cls", "none")[0]
    assert "--best-checkpoint-metric" not in quick_cls  # no keep_best: the last checkpoint, the command (and cache key) unchanged


def test_a_planned_column_plans_for_its_twins_bytes_objective_and_largest_k(tmp_path):
    """plan_<twin>: the twin's objective, final bits and updates; a menu reaching the twin's largest K only when the
    twin goes beyond the planner's default (the x20 schedule's K=1024 embedding), the default menu otherwise."""
    from quant_noise_plugin.schedule import load_schedule

    runner = Runner(load_grid(), "annealed", 1, tmp_path / "work", tmp_path / "data")
    wide = [str(c) for c in runner.plan_command("lm", "none", "plan_ipq")[0]]
    twin = load_schedule(runner.schedule("lm", "ipq"))
    assert twin.largest_centroids == 1024
    assert wide[wide.index("--centroids") + 1:wide.index("-o")] == ["4", "8", "16", "32", "64", "128", "256", "512", "1024"]
    assert wide[wide.index("--objective") + 1] == twin.objective and wide[wide.index("--updates") + 1] == str(twin.total_updates)
    assert "TWIN_BYTES" in wide  # the target is the twin's file, known once it is packed
    assert wide[wide.index("--candidates") + 1] == str(runner.schedule("lm", "ipq"))  # measured against its twin
    narrow = [str(c) for c in runner.plan_command("lm", "none", "plan_ipq_x50_out")[0]]
    assert "--centroids" not in narrow and narrow[narrow.index("--scalar-bits") + 1] == "8"


def test_a_plan_written_by_another_plan_command_does_not_key_the_planned_columns_runs(tmp_path):
    """A changed plan command (a new flag of `quant-noise plan`) replans: until then the planned column's iPQ run, and
    so its file and cell, are not those of the old YAML, which would otherwise read as done."""
    runner = Runner(load_grid(), "annealed", 1, tmp_path / "work", tmp_path / "data")
    cmd, out = runner.plan_command("lm", "none", "plan_ipq_x50_out")
    out.parent.mkdir(parents=True)
    out.write_text("stages: []\n")
    unplanned = runner.ipq_command("lm", "none", "plan_ipq_x50_out")[1]
    out.with_suffix(".command").write_text(" ".join(runner.normalized(cmd)).replace("--anchors 2", "--anchors 1"))
    assert not runner.plan_is_current("lm", "none", "plan_ipq_x50_out")
    assert runner.ipq_command("lm", "none", "plan_ipq_x50_out")[1] == unplanned  # the old plan's YAML keys nothing
    out.with_suffix(".command").write_text(" ".join(runner.normalized(cmd)))
    assert runner.plan_is_current("lm", "none", "plan_ipq_x50_out")
    assert runner.ipq_command("lm", "none", "plan_ipq_x50_out")[1] != unplanned  # the current plan keys its run by its YAML


def test_a_run_that_plans_for_a_size_is_keyed_by_the_planners_version(tmp_path, monkeypatch):
    """--ipq-target-size plans inside the run: a planner whose defaults plan differently is another run, not a cached one."""
    from quant_noise_plugin import budget

    runner = Runner(load_grid(), "annealed", 1, tmp_path / "work", tmp_path / "data")
    column = next(iter(runner.preset.lm.targets))
    today = runner.ipq_command("lm", "none", column)[1]
    monkeypatch.setattr(budget, "PLANNER_VERSION", budget.PLANNER_VERSION + 1)
    assert runner.ipq_command("lm", "none", column)[1] != today
