#!/usr/bin/env python3
"""The paper's Table 1 in small, on real text: `make reproduce` (hours on 2 CPU cores).

LM (KJV, perplexity), MT (KJV -> RV1909, sacrebleu BLEU) and a verse-pair classifier (accuracy).
Rows are training recipes, columns compression methods, both data in configs/experiments/*.yaml;
every cell is a real evaluation of a real compressed checkpoint, on the valid split (to choose) and
the test split (to report), with its real size on disk, for each seed. Runs and cells are cached
under --work by their configuration and fairseq resumes interrupted runs, so a rerun continues
where it stopped. Tables, plot and cells go to --results (default: WORK/results; the shipped
tables under results/ are replaced only when --results names them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # cls_baselines, read for the classifier table
from experiments.ablation import render_ablation  # noqa: E402
from experiments.frontier import FRONTIER_TASKS, as_cell, file_name, frontier_records, merged, plot_frontier, render_frontier  # noqa: E402
from experiments.cache import Cells, write_atomic  # noqa: E402
from experiments.cell import cell  # noqa: E402
from experiments.grid import CONFIGS, DEFAULT_PRESET, REPO, TASKS, Grid, GridError, load_grid  # noqa: E402
from experiments.plot import plot  # noqa: E402
from experiments.provenance import portable  # noqa: E402
from experiments.runs import Runner  # noqa: E402
from experiments.shell import sh  # noqa: E402
from experiments.tables import TABLE_FILES, cls_baselines_text, render  # noqa: E402

RESULT_JSON = {"grid": "reproduce.json", "ablation": "ablation_noise.json", "frontier": file_name("lm", "json")}
TABLES = tuple(RESULT_JSON)


def listing(grid: Grid) -> str:
    """What exists, for --help: presets, experiments, rows and columns."""
    lines = ["presets (configs/experiments/presets.yaml):"]
    lines += [f"  {name}: {p.doc}" for name, p in grid.presets.items()]
    lines += ["experiments (configs/experiments/experiments.yaml):"]
    lines += [f"  {name}: {e.doc}" for name, e in grid.experiments.items()]
    for task in TASKS:
        lines += [f"{task} modes (configs/experiments/{task}.yaml): {', '.join(grid.tasks[task].modes)}"]
    lines += [f"columns: fp32, {', '.join(grid.packings)}, a preset's schedule (ipq, ...), SCHEDULE+PACKING (configs/experiments/columns.yaml)"]
    return "\n".join(lines)


def parse(argv, grid: Grid) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=listing(grid),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=str(CONFIGS), help="folder of the grid's YAML files (default: configs/experiments)")
    parser.add_argument("--preset", choices=list(grid.presets), default=DEFAULT_PRESET)
    parser.add_argument("--experiment", choices=list(grid.experiments), help="a named selection (preset, rows, columns)")
    parser.add_argument("--data", default=str(REPO / "data"))
    parser.add_argument("--work", default=str(REPO / "work_dirs" / "reproduce"))
    parser.add_argument("--results", help="where tables, plot and cells go (default: WORK/results)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: the preset's, 1); tables show each and their mean")
    parser.add_argument("--table", choices=TABLES,
                        help="grid (default): lm_kjv.md / mt_en_es.md / cls_kjv_pairs.md; ablation: ablation_noise.md (valid and test, "
                             "vs the dense control); frontier: frontier_lm.md/.png/.json, the classifier's frontier_cls.* (the records computed replace "
                             "theirs, the others are kept)")
    for task in TASKS:
        parser.add_argument(f"--{task}-modes", nargs="*", help=f"rows of the {task} table (default: configs/experiments/{task}.yaml's tables)")
        parser.add_argument(f"--{task}-columns", nargs="*")
        parser.add_argument(f"--{task}-schedule", help=f"iPQ schedule YAML of the {task} ipq column (default: the preset's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where fairseq runs")
    parser.add_argument("--dry-run", action="store_true", help="print the fairseq commands of the missing cells, run nothing")
    parser.add_argument("--render-only", action="store_true",
                        help="compute nothing: tables and plot from the cells cached under --work, else from the results folder's own JSON")
    args = parser.parse_args(argv)
    if args.experiment:
        exp = grid.experiments[args.experiment]
        args.preset = exp.preset
        args.table = args.table or exp.table
        for task in TASKS:
            setattr(args, f"{task}_modes", list(exp.modes) if task == exp.task else [])
            setattr(args, f"{task}_columns", list(exp.columns) if task == exp.task else [])
    args.table = args.table or "grid"
    for task in TASKS:
        if args.table == "frontier" and task != "lm" and getattr(args, f"{task}_modes") is None:
            setattr(args, f"{task}_modes", [])  # the frontier is the LM's
        modes, columns = grid.table(task, "grid" if args.table == "frontier" else args.table)
        if getattr(args, f"{task}_modes") is None:
            setattr(args, f"{task}_modes", modes)
        if getattr(args, f"{task}_columns") is None:
            setattr(args, f"{task}_columns", columns)
        for kind, check in (("modes", lambda m: grid.mode(task, m)), ("columns", lambda c: grid.check_column(task, args.preset, c))):
            try:
                for name in getattr(args, f"{task}_{kind}"):
                    check(name)
            except GridError as error:
                parser.error(f"--{task}-{kind}: {error}")
        path = getattr(args, f"{task}_schedule")
        if path:
            from quant_noise_plugin.schedule import ScheduleError, load_schedule

            if not Path(path).is_file():
                parser.error(f"--{task}-schedule: no such file {path}")
            try:
                load_schedule(path)  # a bad schedule fails here, in one line, not hours into the grid
            except ScheduleError as error:
                parser.error(f"--{task}-schedule: {error}")
    args.results = args.results or str(Path(args.work) / "results")
    return args


def main(argv=None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--grid", default=str(CONFIGS))
    try:
        grid = load_grid(Path(pre.parse_known_args(argv)[0].grid))
    except GridError as error:
        sys.exit(f"reproduce.py: error: {error}")
    args = parse(argv, grid)
    command = "scripts/reproduce.py " + portable(sys.argv[1:] if argv is None else argv)
    if not (args.render_only or args.dry_run) and not (Path(args.data) / ".complete.json").exists():
        sh(["quant-noise", "data", "--output", args.data])
    seeds = args.seeds or [grid.presets[args.preset].seed]
    schedules = {task: getattr(args, f"{task}_schedule") for task in TASKS}
    runners = {seed: Runner(grid, args.preset, seed, Path(args.work), Path(args.data), args.device, schedules, args.dry_run) for seed in seeds}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    fallback = [out / RESULT_JSON[args.table]]
    if args.table == "frontier":
        fallback = [out / file_name(task, "json") for task in FRONTIER_TASKS] + [out / RESULT_JSON["ablation"], out / RESULT_JSON["grid"]]
    cells = Cells(Path(args.work).resolve(), stored_cells(fallback) if args.render_only else [], args.preset)
    selection = {task: (getattr(args, f"{task}_modes"), getattr(args, f"{task}_columns")) for task in TASKS}
    results = []
    for seed in seeds:  # every cell of the first seed, then of the next: partial tables are complete rows early
        for task in TASKS:
            for mode in selection[task][0]:
                for column in selection[task][1]:
                    result = cell(runners[seed], cells, task, mode, column, command, compute=not args.render_only)
                    if result is not None:
                        results.append(result)
                        write_outputs(results, args.table, selection, runners[seeds[0]], out, seeds, command)
    names = {"ablation": ("ablation_noise.md",), "frontier": tuple(file_name(t, "md") for t in FRONTIER_TASKS)}.get(args.table, tuple(TABLE_FILES.values()))
    for name in names:
        if (out / name).exists():
            print((out / name).read_text())


def stored_cells(paths: List[Path]) -> List[dict]:
    """The records of the results folder's JSON files, as grid cells (frontier records read back), first file first."""
    return [as_cell(r) if "recipe" in r else r for path in paths if path.is_file() for r in json.loads(path.read_text())]


def write_outputs(results: List[dict], table: str, selection: Dict, runner: Runner, out: Path, seeds: List[int], command: str) -> None:
    tasks = [task for task in TASKS if any(r["task"] == task for r in results)]
    if table == "frontier":
        for task in (t for t in tasks if t in FRONTIER_TASKS):
            path = out / file_name(task, "json")
            records = merged(json.loads(path.read_text()) if path.exists() else [], frontier_records(results, runner.preset_name, task))
            preamble = cls_baselines_text(cls_baselines_of(runner)) if task == "cls" else ""
            text = render_frontier(records, runner.grid, command, task, preamble)  # before writing: its commit line must not see the tree dirty
            write_atomic(path, json.dumps(records, indent=1))
            write_atomic(out / file_name(task, "md"), text)
            plot_frontier(records, out / file_name(task, "png"), task)
        return
    if table == "ablation":
        parts = [render_ablation(results, task, *selection[task], runner, seeds, command) for task in tasks]
        reading = "What the rows say, failures included: docs/findings.md.\n\n"
        write_atomic(out / "ablation_noise.md", "# Where and when to put Quant-Noise: the ablation\n\n" + reading + "\n\n".join(parts))
        write_atomic(out / "ablation_noise.json", json.dumps(results, indent=1))
        return
    for task in tasks:
        baselines = cls_baselines_text(cls_baselines_of(runner)) if task == "cls" else ""
        write_atomic(out / TABLE_FILES[task], render(results, task, *selection[task], runner, seeds, command, baselines))
    write_atomic(out / "reproduce.json", json.dumps(results, indent=1))
    plot(results, out / "size_vs_quality.png")


def cls_baselines_of(runner: Runner) -> dict:
    """The classifier's majority-class and bag-of-words accuracies on its data (computed once, cached beside it)."""
    from cls_baselines import baselines

    return baselines(runner.data)


if __name__ == "__main__":
    main()
