"""NFT (Negative-aware Fine-Tuning, arXiv 2505.18116): likelihood training on correct answers *and* on an
implicit negative policy built from the same model, as pure tensor functions.

B prompts × G samples = N rows, grouped contiguously (rows `g·G … g·G+G−1` share a prompt); T tokens.
Rewards are binary, r ∈ {0, 1} (correct / incorrect).

The sampler π_old splits per prompt into its correct and incorrect parts, π_old = r̂·π⁺ + (1 − r̂)·π⁻, with r̂
the prompt's correct rate. NFT models π⁺ with the trained policy π_θ, which makes the negative policy
implicit: π⁻_θ = (π_old − r̂·π_θ)/(1 − r̂), whose likelihood ratio to π_old is (1 − r̂·R)/(1 − r̂). Maximum
likelihood of π_θ on the correct answers and of π⁻_θ on the incorrect ones gives, per token:

    r̂  = clamp(mean_g r, rate_min, rate_max)                 group correct rate (0.02, 0.98)
    R  = exp(min(logp − old_logp, log_ratio_cap))             token likelihood ratio (cap 10)
    ω  = 1 − r̂                      (`normalize=1`, default)  prompt weight
    ω  = √((1 − r̂)/r̂)               (`normalize=2`)
    L  = −ω · log R                                            positive token (r = 1): plain likelihood
    L  = −neg_weight · ω · log max_v((1 − r̂R)/(1 − r̂), ε)      negative token (r = 0)
    max_v(x, ε) = x + sg(max(x, ε) − x)                        clips the value, passes the gradient

The scalar loss is `ops.aggregate(L, mask, reduction(args), totals)` = Σ_rows Σ_t L·m / 1000 ("token-sum-norm").
No KL, no PPO clip. Dropping all-correct / all-wrong groups (dynamic sampling) is the stage's job.
For the RL stage: `credit(rewards, G, args)` gives the per-row `reward` and `rate`, `loss(logp, batch, args)`
the per-token loss of a collated batch.

The weighting convention, derived (∂/∂logp with R = e^{logp − old_logp}, so ∂R/∂logp = R):
    positive:  ∂/∂logp [−log R] = −1
    negative:  ∂/∂logp [−log((1 − r̂R)/(1 − r̂))] = r̂R/(1 − r̂R)      (before the clamp)
On-policy R = 1, so x = (1 − r̂)/(1 − r̂) = 1 ≥ ε = 1 (the clamp is not hit) and the same ω multiplies both
terms: positive tokens get −ω, negative tokens ω·r̂/(1 − r̂). With ω = 1 − r̂ these are −(1 − r̂) and +r̂, i.e.
−(r − r̂) for r = 1 and r = 0: exactly −A of Dr.GRPO, A = r − mean_g r (and mean_g r = r̂ for 0/1 rewards).
Rewards [1,0,0,0]: r̂ = 0.25, ω = 0.75 → −0.75 on positive tokens, +0.75·0.25/0.75 = +0.25 on negative ones
(Dr.GRPO advantages +0.75 / −0.25). With ω = √((1 − r̂)/r̂) they are −√((1 − r̂)/r̂) and +√(r̂/(1 − r̂)) =
−(r − r̂)/√(r̂(1 − r̂)): GRPO with the *population* std (a 0/1 group's is √(r̂(1 − r̂))) and adv_eps = 0.
Both equivalences need r̂ inside [rate_min, rate_max] (mixed groups, G ≤ 50): a constant group has GRPO
advantage 0 but keeps an NFT gradient from the clamped r̂ (all correct: r̂ = 0.98, −0.02 per positive token;
all wrong: r̂ = 0.02, +0.02 per negative token with normalize=1), which is why the official runs drop them.

Off-policy (R ≠ 1; the official 7B run takes 16 optimizer steps per rollout batch) NFT and GRPO differ:
NFT has no clip; a positive token keeps gradient −ω whatever R; a negative token gets
ω·r̂R / ((1 − r̂)·max(x, ε)), x = (1 − r̂R)/(1 − r̂). For R ≤ 1 (x ≥ 1) that is ω·r̂R/(1 − r̂R); for R > 1 the
official ε = 1 clamps the value to 0 but keeps the gradient ω·r̂R/(1 − r̂), linear in R. With a small ε the
gradient ω·r̂R/(1 − r̂R) explodes as R → 1/r̂ (r̂ = 0.25, R = 3.9: 29.25 vs 0.975 with ε = 1), and for
R > 1/r̂ the unclamped x is negative (log undefined).

Where this departs from the paper / official code (NVlabs/NFT), and why:
- Rewards are 0/1 and checked (`check_binary`): NFT's derivation needs correct/incorrect outcomes; a shaped
  reward (format bonus, length penalty) silently breaks r̂ and the positive/negative split. The official
  verifier scores ±1 and recovers r̂ = (mean + 1)/2, the same number.
- `max_v` is computed as sg(max(x, ε)) + (x − sg(x)): the same value and gradient as x + sg(max(x, ε) − x),
  but the value is *exactly* max(x, ε); the literal form loses it to rounding when |x| ≫ 1 (x reaches −1.1e6
  at R = e^10, r̂ = 0.98, where fp32 spacing is 0.125).
- Token-level ratios only (the official `ratio_type="token"`, used in its runs); the sequence-level variant is
  not implemented. The official positive clamp (`clamp_positive = 0` in its runs, a no-op since R > 0) and
  entropy bonus (0 in its runs) are omitted.
- The 1000 normaliser is applied once to the whole optimizer batch (all micro-batches and ranks), so the
  gradient does not depend on how the batch is split. The official run sums its micro-batch losses without
  rescaling (dynamic batch sizes) but FSDP then *averages* gradients over data-parallel ranks, so its
  effective normaliser is 1000 × ranks (8 GPUs in `train_7B.sh`: 8000). Adam hardly sees a constant factor,
  but gradient clipping (1.0) does: set `loss_norm` to 1000 × the official rank count to match it exactly.
- `correct_rate` runs on whole groups *before* the batch is split, and `policy_loss` takes r̂ per row, so a
  micro-batch holding part of a group still sees the group's r̂. The stage's dynamic sampling (on in the
  official runs) drops whole groups, so it never changes a kept group's r̂.
- `old_logp` is a constant of the objective: `policy_loss` detaches it (and `rewards`, `rate`).
All arithmetic is fp32 (fp64 inputs stay fp64), whatever the dtype of the log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch

from posttrain.datatypes import LossOutput, Reduction


@dataclasses.dataclass(frozen=True)
class Args:
    """Defaults are the official 7B run's (`train_7B.sh`: normalize 1, neg_weight 1, clamp_negative 1.0)."""

    normalize: Literal[1, 2] = dataclasses.field(
        default=1,
        metadata={
            "doc": "prompt weight ω: 1 → 1 − r̂ (official; = Dr.GRPO on-policy), "
            "2 → √((1 − r̂)/r̂) (= GRPO with population std on-policy)"
        },
    )
    neg_weight: float = dataclasses.field(
        default=1.0,
        metadata={"doc": "weight of the negative (implicit-policy) term: 1 NFT, 0 RFT (positives only)", "ge": 0},
    )
    neg_eps: float = dataclasses.field(
        default=1.0,
        metadata={
            "doc": "ε of max_v on the negative ratio (official 1.0); a small ε explodes the gradient near R → 1/r̂",
            "gt": 0,
        },
    )
    rate_min: float = dataclasses.field(
        default=0.02, metadata={"doc": "lower clamp of the group correct rate r̂", "gt": 0, "lt": 1}
    )
    rate_max: float = dataclasses.field(
        default=0.98, metadata={"doc": "upper clamp of the group correct rate r̂", "gt": 0, "lt": 1}
    )
    log_ratio_cap: float = dataclasses.field(
        default=10.0, metadata={"doc": "R = exp(min(logp − old_logp, cap)); beyond it no gradient", "gt": 0}
    )
    loss_norm: float = dataclasses.field(
        default=1000.0, metadata={"doc": "the loss is the token sum over the batch divided by this", "gt": 0}
    )

    def __post_init__(self):
        if not self.rate_min <= self.rate_max:
            raise ValueError(f"rate_min {self.rate_min} must not exceed rate_max {self.rate_max}")
        if self.normalize not in (1, 2):
            raise ValueError(f"normalize must be 1 (ω = 1 − r̂) or 2 (ω = √((1 − r̂)/r̂)), got {self.normalize!r}")


def check_binary(rewards: torch.Tensor | Sequence[float]) -> None:
    """Raise `ValueError` unless every reward is exactly 0 or 1."""
    r = torch.as_tensor(rewards)
    bad = ~((r == 0) | (r == 1))
    if bool(bad.any()):
        values = list(dict.fromkeys(float(v) for v in r[bad].flatten().tolist()))[:5]
        raise ValueError(
            f"NFT needs correct/incorrect rewards, each exactly 0 or 1; got {int(bad.sum())} other value(s), "
            f"e.g. {values}. Turn off format/length shaping (and reward weights other than 1) or use a binary "
            f"verifier."
        )


def correct_rate(rewards: torch.Tensor | Sequence[float], group_size: int, args: Args = Args()) -> torch.Tensor:
    """Per-row group correct rate r̂ `[N]`, clamped to [rate_min, rate_max]; groups of `group_size` rows.

    Computed on whole groups, before the batch is split into micro-batches.
    """
    r = torch.as_tensor(rewards)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    if r.dim() != 1 or group_size < 1 or r.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(r.shape)}")
    check_binary(r)
    rate = r.view(-1, group_size).mean(dim=1, keepdim=True).clamp(args.rate_min, args.rate_max)
    return rate.expand(-1, group_size).reshape(-1)


def omega(rate: torch.Tensor | float, normalize: int) -> torch.Tensor:
    """Prompt weight ω from the (clamped) correct rate: 1 − r̂ (`normalize=1`) or √((1 − r̂)/r̂) (`normalize=2`)."""
    rate = torch.as_tensor(rate)
    if normalize == 1:
        return 1.0 - rate
    if normalize == 2:
        return torch.sqrt((1.0 - rate) / rate)
    raise ValueError(f"unknown normalize {normalize!r} (1 or 2)")


def max_v(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x + sg(max(x, eps) − x)`: the value of max(x, eps), the gradient of x (∂/∂x = 1 everywhere).

    Written as sg(max(x, eps)) + (x − sg(x)) so the value is exactly max(x, eps) even when |x| ≫ eps.
    """
    d = x.detach()
    return d.clamp(min=eps) + (x - d)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rewards: torch.Tensor,
    rate: torch.Tensor,
    mask: torch.Tensor,
    args: Args,
) -> LossOutput:
    """Per-token NFT loss `[N, T]`, its mask and metric sums.

    `logp`, `old_logp`, `mask`: `[N, T]`; `rewards` `[N]` in {0, 1}; `rate` `[N]` from `correct_rate` (r̂ of
    each row's group). Metrics are sums over the mask (the learner divides by the global token count):
    `pg_loss`, `pos_tokens`, `neg_tokens`, `clamp_hits` (negative tokens whose value the ε clamp replaced,
    x < ε), `ratio` (R) and `rate` (r̂).
    """
    check_binary(rewards)
    logp = _fp32(logp)
    old_logp = _fp32(old_logp).detach()
    r = _rows(rewards, logp)
    rate = _rows(rate, logp)
    m = mask.bool()

    log_ratio = (logp - old_logp).clamp(max=args.log_ratio_cap)
    ratio = torch.exp(log_ratio)
    w = omega(rate, args.normalize)
    positive_loss = -w * log_ratio  # = −ω·log R, without the exp/log round trip
    x = (1.0 - rate * ratio) / (1.0 - rate)
    negative_loss = -args.neg_weight * w * torch.log(max_v(x, args.neg_eps))
    positive = (r == 1).expand_as(logp)
    loss = torch.where(positive, positive_loss, negative_loss)
    loss = torch.where(m, loss, torch.zeros_like(loss))

    metrics = dict(
        pg_loss=_msum(loss, m),
        pos_tokens=_msum(positive, m),
        neg_tokens=_msum(~positive, m),
        clamp_hits=_msum(~positive & (x.detach() < args.neg_eps), m),
        ratio=_msum(ratio, m),
        rate=_msum(rate.expand_as(logp), m),
    )
    return LossOutput(loss=loss, mask=m, metrics=metrics)


def reduction(args: Args, max_tokens: int | None = None) -> Reduction:
    """Σ_rows Σ_t L·m / loss_norm over the whole optimizer batch (`max_tokens`, which the RL stage passes to
    every algorithm, is not used: NFT's normaliser is a constant)."""
    return Reduction(mode="token-sum-norm", norm=float(args.loss_norm))


# ------------------------------------------------------------------------------------------------------
# The RL stage's contract (stages/rl.py): per-row credit from rewards, and the per-token loss of a batch.


def credit(rewards: torch.Tensor, group_size: int, args: Args) -> dict[str, torch.Tensor]:
    """Per-row tensors the loss needs: the 0/1 `reward` and its group's clamped correct rate `rate` (r̂),
    computed here on whole groups, before the batch is split into micro-batches."""
    r = torch.as_tensor(rewards)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    check_binary(r)
    return {"reward": r, "rate": correct_rate(r, group_size, args)}


def loss(logp: torch.Tensor, batch: dict, args: Args) -> LossOutput:
    """`policy_loss` on a collated RL batch (`old_logp` defaults to `logp` detached: on-policy, R ≡ 1)."""
    return policy_loss(logp, batch.get("old_logp", logp.detach()), batch["reward"], batch["rate"], batch["mask"], args)


def needs_reference(args: Args) -> bool:
    """NFT has no KL term: no reference model is loaded."""
    return False


def _rows(values, like: torch.Tensor) -> torch.Tensor:
    """A per-row `[N]` (or `[N, T]`) tensor as a detached `[N, 1]` (`[N, T]`) in `like`'s dtype and device."""
    v = torch.as_tensor(values, device=like.device).detach().to(like.dtype)
    return v.unsqueeze(-1) if v.dim() == 1 else v


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 log-probs are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _msum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    v = values.detach()
    v = v.float() if v.dtype == torch.bool else v
    return torch.where(mask, v, torch.zeros_like(v)).sum()
