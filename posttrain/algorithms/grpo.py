"""GRPO, Dr.GRPO and DAPO: group-relative advantages and a clipped surrogate, as pure tensor functions.

B prompts × G samples = N rows, grouped contiguously (rows `g·G … g·G+G−1` share a prompt); T tokens.

Advantage (one value per row, broadcast over its tokens):
    A_i = (r_i − mean_g r) / (std_g r + eps)         GRPO  (`adv_std` "unbiased" or "population")
    A_i =  r_i − mean_g r                            Dr.GRPO (`adv_std="none"`)

Per-token loss, with ρ = exp(logp − old_logp):
    pg   = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))
    pg   = min(pg, −A·c)                   only where A < 0 (dual clip, `dual_clip` = c)
    pg   = w · pg,  w = sg(min(exp(old_logp − rollout_logp), C))       (TIS, `tis_cap` = C)
    L    = pg + β · k(logp, ref_logp)      k ∈ {k1, k2, k3} (`kl_estimator`, default k3), β = `kl_coef`

The scalar loss is `ops.aggregate(L, mask, reduction(args, max_tokens), totals)`:
    GRPO     seq-mean-token-mean       (1/N) Σ_i (1/|o_i|) Σ_t L_it
    Dr.GRPO  seq-mean-token-sum-norm   Σ L / (N · max_tokens)
    DAPO     token-mean                Σ L / Σ |o_i|     with ε_high 0.28, no KL, overlong shaping
DAPO's soft overlong punishment is the `length` reward (rewards/length.py); dynamic sampling belongs to the stage.
`ppo_epochs` (μ) is read by the stage: with μ = 1 and one optimizer step per rollout batch, ρ ≡ 1.

Where this departs from the papers, and why:
- std: DeepSeekMath does not say which std; we default to the unbiased one (N−1), as TRL and verl do
  (torch's default), with eps 1e-6 (verl; TRL uses 1e-4). "population" is the other reading.
- A zero-variance group gets A = 0 *exactly* (the formula gives roundoff/eps, which need not be 0), and G = 1
  gives A = 0 for every `adv_std` (the unbiased std of one sample is undefined: 0/0).
- The log-ratio is clamped to [−20, 20] before `exp` (as verl does) so a stray pad or a stale `old_logp`
  cannot produce inf·0 = NaN; it changes nothing for ratios within e^±20.
- KL: the GRPO paper adds β·k3 per token inside the objective; we do the same (it is reduced with the policy
  term). As a loss term differentiated through sampled tokens, k3 gives the *forward* KL(ref‖π) gradient in
  expectation, not the reverse KL the paper writes; see `kl_penalty`. We keep k3 because it is the paper's
  and the official code's setting; `k2` is the choice for a true reverse-KL gradient.
- Dr.GRPO's official code normalises by a constant: the generation budget (`max_tokens`), not the longest
  response in the batch. N counts rows with at least one loss token (`ops.aggregate`), so rows removed by
  `mask_truncated` leave every denominator.
- TIS corrects the mismatch between the sampler (`rollout_logp`, e.g. vLLM) and the learner's own
  `old_logp`; the weight is detached and truncated from above only, and multiplies the policy term only
  (not the KL term).
- `old_logp`, `rollout_logp` and `ref_logp` are constants of the objective: `policy_loss` detaches them.
All arithmetic is fp32 (fp64 inputs stay fp64), whatever the dtype of the log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch

from posttrain.datatypes import LossOutput, Reduction

LOG_RATIO_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class Args:
    """Defaults are plain GRPO as in TRL / DeepSeekMath with β = 0 (TRL's default: no reference model)."""

    adv_std: Literal["unbiased", "population", "none"] = dataclasses.field(
        default="unbiased",
        metadata={"doc": "advantage std: unbiased (N−1, TRL/verl), population (N), or none (Dr.GRPO: r − mean)"},
    )
    adv_eps: float = dataclasses.field(
        default=1e-6, metadata={"doc": "added to the group std before dividing (verl 1e-6, TRL 1e-4)", "ge": 0}
    )
    clip_low: float = dataclasses.field(
        default=0.2, metadata={"doc": "ε_low: the ratio is clipped below at 1 − clip_low", "ge": 0, "lt": 1}
    )
    clip_high: float = dataclasses.field(
        default=0.2, metadata={"doc": "ε_high: the ratio is clipped above at 1 + clip_high (DAPO 0.28)", "ge": 0}
    )
    dual_clip: float | None = dataclasses.field(
        default=None,
        metadata={"doc": "dual-clip constant c (e.g. 3): caps the loss of A < 0 tokens at −A·c; None: off", "gt": 1},
    )
    kl_coef: float = dataclasses.field(
        default=0.0,
        metadata={"doc": "β of the per-token KL to a frozen reference (paper 0.04); 0 loads no reference", "ge": 0},
    )
    kl_estimator: Literal["k1", "k2", "k3"] = dataclasses.field(
        default="k3", metadata={"doc": "KL estimator used as a loss term: k1, k2 or k3 (GRPO)"}
    )
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = dataclasses.field(
        default="seq-mean-token-mean",
        metadata={
            "doc": "GRPO seq-mean-token-mean; DAPO token-mean; Dr.GRPO seq-mean-token-sum-norm (norm = max_tokens)"
        },
    )
    tis_cap: float | None = dataclasses.field(
        default=None,
        metadata={
            "doc": "truncated importance sampling: weight min(exp(old_logp − rollout_logp), tis_cap); None: off",
            "gt": 0,
        },
    )
    mask_truncated: bool = dataclasses.field(
        default=False, metadata={"doc": "rows that hit the length limit get no loss (DAPO overlong filtering)"}
    )
    ppo_epochs: int = dataclasses.field(
        default=1, metadata={"doc": "μ: optimisation passes over each rollout batch", "ge": 1}
    )


def group_advantages(rewards: torch.Tensor | Sequence[float], group_size: int, args: Args) -> torch.Tensor:
    """Group-relative advantage `[N]` from outcome rewards `[N]`, groups of `group_size` contiguous rows.

    `(r − mean_g) / (std_g + adv_eps)`, or `r − mean_g` for `adv_std="none"`. A group whose rewards are
    all equal gets exactly 0; `group_size == 1` gives 0 (no baseline can be formed from one sample).
    """
    r = torch.as_tensor(rewards)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    if r.dim() != 1 or group_size < 1 or r.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(r.shape)}")
    g = r.view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if args.adv_std == "none":
        adv = centred
    elif args.adv_std in ("unbiased", "population"):
        if group_size == 1:
            return torch.zeros_like(r)
        std = g.std(dim=1, keepdim=True, correction=1 if args.adv_std == "unbiased" else 0)
        adv = centred / (std + args.adv_eps)
    else:
        raise ValueError(f"unknown adv_std {args.adv_std!r}")
    constant = (g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True)).expand_as(g)
    return torch.where(constant, torch.zeros_like(adv), adv).reshape(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π‖ref) on tokens sampled from π, with δ = ref_logp − logp:

        k1 = −δ                 unbiased, can be negative; ∂/∂logp = 1
        k2 = δ²/2               biased, ≥ 0;               ∂/∂logp = −δ
        k3 = e^δ − δ − 1        unbiased, ≥ 0;             ∂/∂logp = 1 − e^δ

    As a *loss term* differentiated through the sampled tokens' logp (E over y ~ π, score ∇logp):
    k1 gives E[∇logπ] = 0, i.e. no gradient in expectation; k2 gives E[(logπ − log ref)∇logπ] =
    ∇KL(π‖ref), the reverse-KL gradient; k3 gives E[(1 − ref/π)∇logπ] = −Σ ref ∇logπ = ∇KL(ref‖π), the
    forward-KL gradient. k3 is the default because GRPO (DeepSeekMath) and its official implementations
    use it; pick k2 for the reverse-KL gradient. (A KL subtracted from the *reward* instead gives the
    reverse-KL gradient with any of them.) Gradients flow through both arguments; detach `ref_logp`.
    """
    delta = ref_logp - logp
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        return torch.expm1(delta) - delta
    raise ValueError(f"unknown kl estimator {estimator!r} (k1, k2, k3)")


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """ρ = exp(logp − old_logp) per token, the log-ratio clamped to ±`LOG_RATIO_CLAMP` (no overflow to inf)."""
    return torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float):
    """The PPO surrogate per token, `max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high))`, and where its clipped branch
    was taken (`[N, T]` bool). `adv` broadcasts against `ratio` (`[N, 1]` or `[N, T]`)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    args: Args,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
) -> LossOutput:
    """Per-token clipped-surrogate loss `[N, T]` (+ β·KL), its effective mask and metric sums.

    `logp`, `old_logp`, `mask`, `ref_logp`, `rollout_logp`: `[N, T]`; `adv` `[N]` (or `[N, T]`);
    `truncated` `[N]` bool (the completion hit the length limit). Required: `ref_logp` when
    `kl_coef > 0`, `rollout_logp` when `tis_cap` is set, `truncated` when `mask_truncated`.
    Metrics are sums over the effective mask (the learner divides by the global token count):
    `pg_loss`, `ratio`, `clip_frac` (= `clip_frac_low` + `clip_frac_high`: tokens whose clipped branch
    was taken, A < 0 / A > 0), `dual_clip_frac`, `kl` (when `ref_logp` is given) and `tis_weight`.
    """
    if args.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={args.kl_coef} needs ref_logp (the frozen reference's log-probs)")
    if args.tis_cap is not None and rollout_logp is None:
        raise ValueError(f"tis_cap={args.tis_cap} needs rollout_logp (the sampler's log-probs)")
    if args.mask_truncated and truncated is None:
        raise ValueError("mask_truncated=True needs `truncated` ([N] bool: the row hit the length limit)")

    logp = _fp32(logp)
    old_logp = _fp32(old_logp).detach()
    a = _fp32(adv).detach()
    a = a.unsqueeze(-1) if a.dim() == 1 else a
    m = mask.bool()
    if args.mask_truncated:
        m = m & ~truncated.bool().view(-1, 1)

    ratio = importance_ratio(logp, old_logp)
    pg, took_clip = clipped_surrogate(ratio, a, args.clip_low, args.clip_high)
    metrics: dict[str, torch.Tensor] = {}
    if args.dual_clip is not None:
        cap = -a * args.dual_clip
        dual = (a < 0) & (pg > cap)
        pg = torch.where(dual, cap.expand_as(pg), pg)
        metrics["dual_clip_frac"] = _msum(dual, m)
    if args.tis_cap is not None:
        log_w = (old_logp - _fp32(rollout_logp)).detach()
        weight = torch.exp(log_w).clamp(max=args.tis_cap)
        pg = weight * pg
        metrics["tis_weight"] = _msum(weight, m)
    loss = pg
    if ref_logp is not None:
        kl = kl_penalty(logp, _fp32(ref_logp).detach(), args.kl_estimator)
        if args.kl_coef > 0:
            loss = loss + args.kl_coef * kl
        metrics["kl"] = _msum(kl, m)
    loss = torch.where(m, loss, torch.zeros_like(loss))

    metrics.update(
        pg_loss=_msum(pg, m),
        ratio=_msum(ratio, m),
        clip_frac=_msum(took_clip, m),
        clip_frac_low=_msum(took_clip & (a < 0), m),
        clip_frac_high=_msum(took_clip & (a > 0), m),
    )
    return LossOutput(loss=loss, mask=m, metrics=metrics)


def reduction(args: Args, max_tokens: int) -> Reduction:
    """The `ops.aggregate` reduction of `args.loss_aggregation`; `max_tokens` is the generation budget."""
    if args.loss_aggregation == "seq-mean-token-sum-norm":
        if max_tokens <= 0:
            raise ValueError(f"seq-mean-token-sum-norm needs max_tokens > 0, got {max_tokens}")
        return Reduction(mode="seq-mean-token-sum-norm", norm=float(max_tokens))
    if args.loss_aggregation in ("token-mean", "seq-mean-token-mean"):
        return Reduction(mode=args.loss_aggregation)
    raise ValueError(f"unknown loss_aggregation {args.loss_aggregation!r}")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 log-probs are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _msum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    v = values.detach()
    v = v.float() if v.dtype == torch.bool else v
    return torch.where(mask, v, torch.zeros_like(v)).sum()


# ------------------------------------------------------------------------------------------------------
# The RL stage's contract (stages/rl.py): per-row credit from rewards, and the per-token loss of a batch.


def credit(rewards: torch.Tensor, group_size: int, args: Args) -> dict[str, torch.Tensor]:
    """Per-row tensors the loss needs: the group-relative advantages."""
    return {"adv": group_advantages(rewards, group_size, args)}


def loss(logp: torch.Tensor, batch: dict, args: Args) -> LossOutput:
    """`policy_loss` on a collated RL batch (`old_logp` defaults to `logp` detached: on-policy, ρ ≡ 1)."""
    return policy_loss(
        logp, batch.get("old_logp", logp.detach()), batch["adv"], batch["mask"], args,
        ref_logp=batch.get("ref_logp"), rollout_logp=batch["rollout_logp"] if args.tis_cap else None,
        truncated=batch.get("truncated"),
    )


def needs_reference(args: Args) -> bool:
    return args.kl_coef > 0
