"""One categorical draw per row, by inverse CDF over vocabulary blocks: the hf engine's sampler.

`torch.multinomial` (which transformers' `generate` calls) draws one exponential variate per vocabulary entry
on the CPU (`argmax(p / q)`, q ~ Exp(1)): at a 152k vocabulary that RNG work was 61 % of a decode step
(405 ms of 660 for 128 rows of a 25M-parameter model, one thread). Inverse-CDF sampling needs one uniform per
row. A cumulative sum over the whole vocabulary in fp32 would bias the draw (its rounding grows with the
vocabulary) and one in fp64 costs 4x a softmax, so the draw goes in two levels:

    S_b = sum of p over block b (fp32 sums of `BLOCK` entries, then fp64)
    u ~ U[0, sum_b S_b);   b = the block whose cumulative sum first exceeds u
    v = (u - S_0 - ... - S_{b-1}) / S_b in [0, 1);   i = the entry of b whose fp64 cumulative sum first exceeds v * sum(b)

so P(i) = p_i / sum(p), up to the fp32 rounding of p_i and of its block's sum (relative 1e-7): the same as
any fp32 sampler. Entries with p = 0 (masked by top-k, top-p or suppression) are never drawn: a draw that
fp64 rounding pushes to the end of a cumulative sum is moved back to the last entry with p > 0.
"""

from __future__ import annotations

import torch

BLOCK = 64  # entries per block: 2,374 blocks at 152k; both levels' cumulative sums stay short


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of `probs` [rows, vocab] (non-negative, any positive total), drawn with P(i) ∝ probs[i].

    Uses the default generator of `probs`' device (one fp64 uniform per row), so `torch.manual_seed` makes it
    reproducible. Returns int64 [rows].
    """
    rows, vocab = probs.shape
    sums = _block_sums(probs).double()  # [rows, blocks]
    cumulative = sums.cumsum(-1)
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * cumulative[:, -1:]
    block = _first_above(cumulative, u)  # [rows, 1]
    mass = sums.gather(1, block)
    fraction = ((u - (cumulative.gather(1, block) - mass)) / mass).clamp_(0.0, 1.0)

    columns = block * BLOCK + torch.arange(BLOCK, device=probs.device)  # [rows, BLOCK]
    inside = columns < vocab
    entries = probs.gather(1, columns.clamp(max=vocab - 1)).double() * inside
    inner = entries.cumsum(-1)
    pick = _first_above(inner, fraction * inner[:, -1:])
    return columns.gather(1, pick).squeeze(1)


def _block_sums(probs: torch.Tensor) -> torch.Tensor:
    """[rows, ceil(vocab / BLOCK)] sums of consecutive `BLOCK` entries (the last block may be shorter)."""
    rows, vocab = probs.shape
    whole = vocab // BLOCK * BLOCK
    parts = [probs[:, :whole].reshape(rows, -1, BLOCK).sum(-1)] if whole else []
    if whole < vocab:
        parts.append(probs[:, whole:].sum(-1, keepdim=True))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _first_above(cumulative: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative sum exceeds `value` [rows, 1], never past the last entry > 0.

    `value` < the row's total in exact arithmetic; when rounding makes it equal, searchsorted would return
    an index past every positive entry, so the index is capped at that of the last positive entry (the count
    of cumulative sums below the total).
    """
    index = torch.searchsorted(cumulative, value.contiguous(), right=True)
    last_positive = (cumulative < cumulative[:, -1:]).sum(-1, keepdim=True)
    return torch.minimum(index, last_positive)
