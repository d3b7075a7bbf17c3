"""Stop fairseq-eval-lm before it evaluates nothing.

fairseq-eval-lm cuts the test set into blocks of ``--tokens-per-sample`` tokens (default 1024) and
silently skips every block longer than the model's positions: a model trained with
``--tokens-per-sample 128`` then reports "Evaluated 0 tokens ... Perplexity: 1.00" with exit code 0.
The plugin's language models refuse that, in one line naming the flag to pass.
"""
from ..errors import QuantNoiseError


def check_eval_block_length(max_positions, cfg) -> None:
    """Raise when eval-lm's blocks (context window included) exceed the model's positions."""
    task = cfg.get("task") if hasattr(cfg, "get") else getattr(cfg, "task", None)
    tokens = getattr(task, "tokens_per_sample", None)
    if tokens is None or not isinstance(max_positions, int):
        return
    eval_lm = cfg.get("eval_lm") if hasattr(cfg, "get") else getattr(cfg, "eval_lm", None)
    context = int(getattr(eval_lm, "context_window", 0) or 0)
    block = int(tokens) + context  # eval-lm has already taken the context window off tokens_per_sample
    if context and int(tokens) <= 0:
        raise QuantNoiseError(f"--context-window {context} leaves no new token in blocks of --tokens-per-sample {block}: "
                              f"use a context window smaller than --tokens-per-sample (e.g. half of it)")
    if block > max_positions:
        raise QuantNoiseError(
            f"--tokens-per-sample {block} is longer than the model's {max_positions} positions: every block would be "
            f"skipped and nothing evaluated (fairseq reports perplexity 1.00 on 0 tokens); pass --tokens-per-sample "
            f"{max_positions} (context included, e.g. --tokens-per-sample {max_positions} --context-window {max_positions // 2})"
        )


class EvalLengthGuardMixin:
    """fairseq calls ``prepare_for_inference_(cfg)`` with the evaluation's config before loading data."""

    def prepare_for_inference_(self, cfg):
        check_eval_block_length(self.max_positions(), cfg)
        return super().prepare_for_inference_(cfg)
