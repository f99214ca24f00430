"""Shared tensor ops: token log-probs, masked means, and the one loss aggregation every stage uses."""

from __future__ import annotations

import torch

from posttrain.datatypes import BatchTotals, Reduction


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position, in fp32.

    logits `[N, T, V]`, targets `[N, T]` → `[N, T]`. Computed as `z[target] − logsumexp(z)` so no
    `[N, T, V]` log-softmax tensor is kept beside the logits.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum() if dim is None else (values * m).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over masked entries; 0 where nothing is masked in (never NaN)."""
    total = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / total.clamp(min=1)


def batch_totals(mask: torch.Tensor) -> BatchTotals:
    """Local counts of one micro-batch; the learner sums them over micro-batches and processes."""
    return BatchTotals(tokens=float(mask.sum()), seqs=float((mask.sum(-1) > 0).sum()))


def aggregate(loss: torch.Tensor, mask: torch.Tensor, reduction: Reduction, totals: BatchTotals) -> torch.Tensor:
    """This micro-batch's share of the optimizer batch's scalar loss.

    `totals` are counts over the *whole* optimizer batch (all micro-batches, all processes), so summing
    this over micro-batches and processes gives the same value however the batch is split:
      token-mean               Σ L·m / Σ m
      seq-mean-token-mean      (1/N) Σ_i (Σ_t L·m / Σ_t m)         (original GRPO; SFT `seq-mean`)
      seq-mean-token-sum-norm  Σ L·m / (N · norm), norm = T_max    (Dr.GRPO)
      token-sum-norm           Σ L·m / norm, norm = 1000           (NFT)
    N counts rows with at least one loss token.
    """
    m = mask.to(loss.dtype)
    if reduction.mode == "token-mean":
        return (loss * m).sum() / max(totals.tokens, 1.0)
    if reduction.mode == "seq-mean-token-mean":
        per_row = (loss * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_row.sum() / max(totals.seqs, 1.0)
    if reduction.mode == "seq-mean-token-sum-norm":
        return (loss * m).sum() / (max(totals.seqs, 1.0) * _norm(reduction))
    if reduction.mode == "token-sum-norm":
        return (loss * m).sum() / _norm(reduction)
    raise ValueError(f"unknown reduction mode {reduction.mode!r}")


def _norm(reduction: Reduction) -> float:
    if not reduction.norm:
        raise ValueError(f"reduction {reduction.mode!r} needs a positive `norm`")
    return float(reduction.norm)
