"""The shared nouns passed between stages, algorithms and the learner.

Vocabulary (see DESIGN.md): `logp` learner log-probs now, `old_logp` learner at rollout time,
`rollout_logp` the sampler's, `ref_logp` reference/teacher, `adv` advantages, `mask` loss tokens.
Dims: `B` prompts, `G` group size, `N = B·G` rows, `T` tokens.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: importing the shared nouns stays cheap (no torch)
    import torch

ReductionMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum-norm"]


@dataclasses.dataclass(frozen=True)
class Reduction:
    """How per-token losses become one scalar (see `algorithms.ops.aggregate`).

    `norm` is the constant of the `*-norm` modes: T_max for Dr.GRPO, 1000 for NFT.
    """

    mode: ReductionMode = "token-mean"
    norm: float | None = None


@dataclasses.dataclass
class LossOutput:
    """An algorithm's per-token loss `[N, T]`, the tokens it counts (`mask`, `[N, T]`) and metric sums.

    `metrics` holds per-token *sums* over `mask` (e.g. `nll`): the learner divides them by the global
    token count, so every logged metric is a token-mean over the whole optimizer batch.
    """

    loss: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BatchTotals:
    """Counts over the whole optimizer batch: all micro-batches on all processes."""

    tokens: float
    seqs: float


@dataclasses.dataclass
class MediaPrompt:
    """A prompt with a video: `token_ids` hold the expanded `<|video_pad|>` run (`video.expand_video_tokens`),
    `media` the processed video (`posttrain.video.Media`); the samples of one prompt share its `media`."""

    token_ids: list[int]
    media: object  # posttrain.video.Media
