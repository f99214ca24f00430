"""`posttrain.rollout.sampling.sample_categorical`: the hf engine's draw, against the distribution it samples.

Frequencies are compared with the probabilities within 5 binomial standard errors (seeded, so deterministic);
entries with probability 0 must never come up, including where fp64 rounding lands a draw on the very end of
a cumulative sum.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from posttrain.rollout.sampling import BLOCK, sample_categorical


def assert_frequencies(draws: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    freq, p = counts / draws.numel(), probs.double() / probs.double().sum()
    stderr = (p * (1 - p) / draws.numel()).sqrt()
    assert torch.all((freq - p).abs() <= 5 * stderr + 1e-12), (freq - p).abs().max()
    assert counts[p == 0].sum() == 0


@pytest.mark.parametrize("vocab", [5, BLOCK, 3 * BLOCK + 22])
def test_frequencies_match_probabilities(vocab):
    torch.manual_seed(0)
    logits = torch.randn(vocab) * 2
    logits[torch.randperm(vocab)[: vocab // 3]] = float("-inf")  # masked entries, spread over the blocks
    probs = torch.softmax(logits, -1)
    draws = sample_categorical(probs.expand(100_000, vocab).contiguous())
    assert draws.dtype == torch.int64 and draws.shape == (100_000,)
    assert_frequencies(draws, probs)


def test_unnormalised_weights_and_rows_are_independent():
    """Any positive total works; each row draws from its own weights."""
    weights = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 2.0]]).repeat(20_000, 1)
    draws = sample_categorical(weights).view(20_000, 3)
    assert (draws[:, 1] == 0).all() and (draws[:, 2] == 2).all()
    assert_frequencies(draws[:, 0], torch.tensor([0.0, 3.0, 1.0]))


def test_a_draw_at_the_end_of_the_sums_never_reaches_a_zero_entry():
    """All the mass on the last positive entry, zeros after it in its block and in later blocks: u close to the
    total (forced through the generator) must still pick that entry."""
    vocab = 3 * BLOCK
    probs = torch.zeros(4, vocab)
    probs[:, BLOCK + 5] = 1.0
    probs[0, 2] = 1e-30  # a tiny earlier entry: the total is not exactly the last entry's
    for _ in range(200):
        assert (sample_categorical(probs) == BLOCK + 5).sum() >= 3
    # The extreme directly: a cumulative sum that reaches its total before the end.
    from posttrain.rollout.sampling import _first_above

    cumulative = torch.tensor([[0.25, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert _first_above(cumulative, torch.tensor([[1.0]], dtype=torch.float64)).item() == 1
    assert _first_above(cumulative, torch.tensor([[0.0]], dtype=torch.float64)).item() == 0


def test_seeded_draws_repeat():
    probs = torch.softmax(torch.randn(8, 1000), -1)
    torch.manual_seed(3)
    a = sample_categorical(probs)
    torch.manual_seed(3)
    assert torch.equal(a, sample_categorical(probs))
