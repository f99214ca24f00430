"""Golden values for the shared ops and the SFT objective (hand-derived, see ALGORITHMS.md)."""

import math

import pytest
import torch

from posttrain.algorithms import sft
from posttrain.algorithms.ops import aggregate, batch_totals, masked_mean, token_logprobs
from posttrain.datatypes import BatchTotals, Reduction

# rows with per-token losses [1, 1] and [0, 0, 0, 0] (T_max = 4)
LOSS = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    "reduction, expected",
    [
        (Reduction("token-mean"), 1 / 3),  # 2 / 6
        (Reduction("seq-mean-token-mean"), 0.5),  # (1 + 0) / 2
        (Reduction("seq-mean-token-sum-norm", norm=4), 0.25),  # 2 / (2 · 4)  Dr.GRPO
        (Reduction("token-sum-norm", norm=1000), 0.002),  # 2 / 1000       NFT
    ],
)
def test_aggregation_golden(reduction, expected):
    assert aggregate(LOSS, MASK, reduction, batch_totals(MASK)).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum-norm"])
def test_aggregation_is_split_invariant(mode):
    """Summing per-micro-batch shares with global totals equals the whole-batch value, for any split."""
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(8, 6, generator=g)
    mask = (torch.rand(8, 6, generator=g) > 0.3).long()
    mask[:, 0] = 1
    red = Reduction(mode, norm=6 if "norm" in mode else None)
    whole = aggregate(loss, mask, red, batch_totals(mask))
    totals = batch_totals(mask)
    for size in (1, 2, 4):
        parts = sum(aggregate(loss[i : i + size], mask[i : i + size], red, totals) for i in range(0, 8, size))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_rows_without_tokens_are_not_counted_as_sequences():
    mask = torch.tensor([[1, 1], [0, 0]])
    assert batch_totals(mask) == BatchTotals(tokens=2.0, seqs=1.0)


def test_sft_token_mean_vs_seq_mean_golden():
    """logp [-1, -2] and [-3] → token-mean 2.0, seq-mean 2.25."""
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    for name, expected in (("token-mean", 2.0), ("seq-mean", 2.25)):
        args = sft.Args(loss_reduction=name)
        out = sft.loss(logp, mask, args)
        assert aggregate(out.loss, out.mask, sft.reduction(args), batch_totals(mask)).item() == pytest.approx(expected)


def test_token_logprobs_matches_log_softmax_and_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g)
    targets = torch.randint(0, 5, (2, 3), generator=g)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(token_logprobs(logits, targets, temp), ref, atol=1e-6)
    # uniform logits over 4 classes → log(1/4)
    assert token_logprobs(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long)).item() == pytest.approx(
        math.log(0.25)
    )


def test_masked_mean_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(3), torch.zeros(3)).item() == 0.0
