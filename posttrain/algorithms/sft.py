"""Supervised fine-tuning: masked negative log-likelihood on completion tokens only.

    L = − Σ_i Σ_t m_it · log πθ(y_it | x_i, y_i<t)  / normaliser

`token-mean` divides by the number of completion tokens in the whole optimizer batch (every token
weighs the same; long answers dominate). `seq-mean` averages each sequence's token-mean (every example
weighs the same). Rows with logp [−1, −2] and [−3]: token-mean 2.0, seq-mean 2.25.
Labels are shifted by one in the stage's batching: position t predicts token t+1.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from posttrain.datatypes import LossOutput, Reduction


@dataclasses.dataclass(frozen=True)
class Args:
    loss_reduction: Literal["token-mean", "seq-mean"] = dataclasses.field(
        default="token-mean", metadata={"doc": "token-mean: every token weighs the same; seq-mean: every sequence"}
    )


def reduction(args: Args) -> Reduction:
    return Reduction(mode="token-mean" if args.loss_reduction == "token-mean" else "seq-mean-token-mean")


def loss(logp: torch.Tensor, mask: torch.Tensor, args: Args) -> LossOutput:
    """Per-token NLL `[N, T]` from the learner's log-probs of the target tokens."""
    nll = -logp
    return LossOutput(loss=nll, mask=mask, metrics={"nll": (nll.detach() * mask).sum()})
