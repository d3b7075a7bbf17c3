"""Calibration statistics (calibration.py): what each weight's layers saw, and the k-means weights made of it."""
import pytest
import torch
from torch import nn

from quant_noise_plugin.calibration import IMPORTANCE_DAMPING, collect_input_moments


class TiedLM(nn.Module):
    """Embedding -> Linear -> output projection tied to the embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 6)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.embed.weight
        self.dropout = nn.Dropout(0.5)

    def forward(self, tokens):
        h = self.dropout(self.fc(self.embed(tokens)))
        return self.out(h)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 8, (3, 5), generator=g) for _ in range(4)]  # tokens 8..11 never occur


def _collect(model, batches):
    return collect_input_moments(model, {"fc": ["fc"], "embed": ["embed", "out"]}, batches, model)


def test_moments_are_the_inputs_second_moments_and_lookup_counts():
    model, batches = TiedLM(), _batches()
    model.train()
    moments = _collect(model, batches)
    assert model.training  # mode restored, and no hook left behind
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        model.eval()
        embedded = torch.cat([model.embed(b).reshape(-1, 6) for b in batches]).double()
        hidden = torch.cat([model.fc(model.embed(b)).reshape(-1, 6) for b in batches]).double()
    assert moments["fc"].n_inputs == 60 and torch.allclose(moments["fc"].input_sq, (embedded ** 2).sum(0))
    tokens = torch.cat([b.flatten() for b in batches])
    assert torch.equal(moments["embed"].row_counts, torch.bincount(tokens, minlength=12).double())
    # the projection's inputs are the eval-mode hidden states (dropout off)
    assert torch.allclose(moments["embed"].input_sq, (hidden ** 2).sum(0))


def test_importance_weighs_columns_by_second_moment_and_rows_by_frequency():
    model, batches = TiedLM(), _batches()
    moments = _collect(model, batches)
    fc = moments["fc"].importance()
    second = moments["fc"].input_sq / moments["fc"].n_inputs
    assert fc.shape == (1, 6)
    assert torch.allclose(fc[0].double(), second / second.mean() + IMPORTANCE_DAMPING, atol=1e-6)
    tied = moments["embed"].importance()
    assert tied.shape == (12, 6)
    counts = moments["embed"].row_counts
    # rows never looked up keep only the damping's weight; the most frequent row weighs most
    assert torch.all(tied[8:] < tied[:8].min())
    assert int(tied.sum(1).argmax()) == int(counts.argmax())
    looked_up_only = collect_input_moments(model, {"embed": ["embed"]}, batches, model)["embed"].importance()
    assert looked_up_only.shape == (12, 1)


def test_moments_are_deterministic_and_need_a_batch():
    a, b = _collect(TiedLM(), _batches()), _collect(TiedLM(), _batches())
    for key in a:
        assert torch.equal(a[key].importance(), b[key].importance())
    with pytest.raises(ValueError, match="no calibration batch"):
        _collect(TiedLM(), [])


def test_a_learned_positional_embedding_counts_the_positions_it_looks_up_not_the_tokens():
    """fairseq's LearnedPositionalEmbedding is given the tokens and looks up their positions (padding_idx + 1, ...)."""
    class Positions(nn.Embedding):
        max_positions = 6

        def forward(self, tokens):
            mask = tokens.ne(self.padding_idx).long()
            return super().forward(torch.cumsum(mask, dim=1) * mask + self.padding_idx)

    model = nn.Module()
    model.positions = Positions(8, 4, padding_idx=1)
    tokens = torch.tensor([[57, 31, 40], [22, 90, 1]])  # token ids far beyond the table; 1 is padding
    stats = collect_input_moments(model, {"positions": ["positions"]}, [tokens], lambda batch: model.positions(batch))
    assert stats["positions"].row_counts.tolist() == [0, 1, 2, 2, 1, 0, 0, 0]  # position 2 twice, 3 twice, 4 once; the pad at 1
