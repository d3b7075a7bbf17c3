"""The metrics of a cell, each one real CLI run on the compressed checkpoint: ppl, BLEU, accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .runs import Runner
from .shell import PLUGIN, sh

METRICS = {"lm": "ppl", "mt": "bleu", "cls": "acc"}


def metric_of(task: str, subset: str = "test") -> str:
    """The record key of a task's metric: "ppl" on test, "valid_ppl" on valid."""
    return METRICS[task] if subset == "test" else f"valid_{METRICS[task]}"


def perplexity(runner: Runner, path: Path, subset: str) -> float:
    """fairseq-eval-lm, context window half the training length."""
    tokens = runner.preset.tokens_per_sample
    out = sh(["fairseq-eval-lm", runner.data / "lm/bin", "--user-dir", PLUGIN, "--path", path, "--gen-subset", subset,
              *runner.device_flags(), "--tokens-per-sample", tokens, "--max-tokens", 4096, "--context-window", tokens // 2])
    return float(out.rsplit("Perplexity:", 1)[1].split()[0])


def accuracy(runner: Runner, path: Path, subset: str) -> float:
    """fairseq-validate's accuracy (the sentence_prediction criterion logs it)."""
    out = sh(["fairseq-validate", runner.data / "cls" / "bin", "--user-dir", PLUGIN, "--path", path, "--valid-subset", subset,
              *runner.grid.tasks["cls"].train, *runner.length_flags("cls"), "--max-tokens", 8192, *runner.device_flags()])
    return accuracy_of_validate(out, subset)


def accuracy_of_validate(output: str, subset: str) -> float:
    """The accuracy fairseq-validate logs for ``subset`` (its own line, not another subset's or a loss)."""
    lines = [line for line in output.splitlines() if f"valid on '{subset}' subset" in line and "| accuracy " in line]
    if not lines:
        raise SystemExit(f"fairseq-validate logged no accuracy for the {subset} subset")
    return float(lines[-1].split("| accuracy ")[1].split(" |")[0])


def bleu(runner: Runner, path: Path, subset: str) -> float:
    """sacrebleu on fairseq-generate's detokenized output (beam 4) against the raw references."""
    mt = runner.data / "mt"
    out = sh(["fairseq-generate", mt / "bin", "--user-dir", PLUGIN, "--path", path, "--gen-subset", subset, *runner.device_flags(),
              "--beam", 4, "--max-tokens", 4000, "--bpe", "sentencepiece", "--sentencepiece-model", mt / "spm.bpe.model"])
    refs = (mt / "raw" / f"{subset}.es").read_text(encoding="utf-8").splitlines()
    return bleu_of_generate(out, refs)


def bleu_of_generate(output: str, refs: List[str]) -> float:
    """Corpus BLEU of fairseq-generate's "D-<index>" lines (any order) against ``refs``; every
    reference must have its hypothesis, or the score would silently count missing ones as empty."""
    import sacrebleu

    hyps = {}
    for line in output.splitlines():
        if line.startswith("D-"):
            idx, _, text = line[2:].split("\t", 2)
            hyps[int(idx)] = text
    if sorted(hyps) != list(range(len(refs))):
        raise SystemExit(f"fairseq-generate gave {len(hyps)} hypotheses for {len(refs)} references: not scored")
    return sacrebleu.corpus_bleu([hyps[i] for i in range(len(refs))], [refs]).score


EVALUATE = {"lm": perplexity, "mt": bleu, "cls": accuracy}


def evaluate(runner: Runner, task: str, path: Path) -> dict:
    """The task's metric on test (to report) and valid (to choose)."""
    return {metric_of(task, subset): EVALUATE[task](runner, path, subset) for subset in ("test", "valid")}
