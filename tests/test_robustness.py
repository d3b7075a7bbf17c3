"""The robustness benchmark's cases, a handful per class, on the suite's own tiny model (benchmarks/bench_robustness.py)."""
import sys

import pytest

from conftest import COMMON_TRAIN, PLUGIN, REPO, SCHEDULE, TINY_LM, run

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_robustness as bench  # noqa: E402


@pytest.fixture(scope="module")
def fixtures(lm_data, dense_lm, ipq, schedule_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("robustness")
    (work / "logs").mkdir()
    run(["quant-noise", "pack", ipq[0] / "checkpoint_last.pt", work / "packed.pt"])
    ipq_cmd = ["fairseq-train", lm_data, "--task", "ipq_language_modeling", "--ipq-config", schedule_file, "--user-dir", PLUGIN,
               "--finetune-from-model", dense_lm, *COMMON_TRAIN, "--arch", "qn_transformer_lm", *TINY_LM,
               "--lr", "0.0005", "--max-update", "6"]
    return {"work": work, "lm_data": lm_data, "schedule": schedule_file, "dense": dense_lm, "ipq": ipq[0] / "checkpoint_last.pt",
            "packed": work / "packed.pt", "ipq_cmd": ipq_cmd}


def _failures(cases):
    return [f"{c.group}: {c.name}: {c.detail}" for c in cases if c.result == "failure"]


def test_damaged_files_are_refused_in_one_line_or_load_the_same_model(fixtures):
    logs = fixtures["work"] / "logs"
    digests = bench.reference_digests(fixtures, logs)
    cases = bench.file_cases(fixtures, digests, n_flips=8, n_truncations=1, seed=1)
    data_flips = [c for c in cases if c.group == "file:packed-tensor-data"]
    assert len(data_flips) == 2
    bench.run_cases(cases, workers=2, logs=logs)
    assert not _failures(cases)
    assert all(c.result == "one-line" for c in data_flips)  # a flipped byte of tensor data never loads
    assert all(c.result == "one-line" for c in cases if c.expect == "error")


def test_broken_schedules_and_flags_out_of_range_are_one_line_errors(fixtures):
    schedules = bench.schedule_cases(fixtures)
    flags = bench.flag_cases(fixtures)
    cases = schedules[::9] + flags[::5]
    assert len({c.group for c in cases}) == 5
    bench.run_cases(cases, workers=2, logs=fixtures["work"] / "logs")
    assert not _failures(cases)
    assert sum(c.result == "one-line" for c in cases) >= len(cases) - 2


def test_killed_runs_resume_and_writes_are_whole_or_absent(fixtures):
    """An iPQ run SIGKILLed mid-way and rerun ends with the straight run's codebooks; pack/unpack killed mid-write leave
    no partial file; a file-size limit (a full disk) is a one-line error with no partial file, for pack and training."""
    cases = bench.fault_cases(fixtures, n_kills=1, quick=True)
    bench.run_cases(cases, workers=1, logs=fixtures["work"] / "logs")
    assert not _failures(cases)
    assert {c.group for c in cases} == {"fault:ipq-killed", "fault:pack-killed", "fault:unpack-killed", "fault:disk-full"}
    assert all(c.result == "one-line" for c in cases if c.group == "fault:disk-full")
