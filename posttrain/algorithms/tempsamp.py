"""TempSamp-R1 (arXiv 2509.18056): GRPO with one off-policy ground-truth row per group and a soft advantage.

B prompts × G rows, grouped contiguously. The stage fills rows 0 … G−2 of each group with the policy's samples
and row G−1 with the reference answer rendered by `reference` (for temporal grounding
`<answer> {s:.2f} to {e:.2f} </answer>`, then EOS); the reward registry scores all G rows alike.

Soft advantage, applied to every row's IoU r (the `shaped_reward` component, not the weighted total) before
the other rewards are added and the group normalised (τ = `tau`, α = `alpha`):

    r̂ = τ + 0.01 · ln(r − τ + 1)                    r ≥ τ   (compresses the top: near-perfect ≈ perfect)
    r̂ = τ − (e^{α(τ − r)} − 1) / (e^α − 1)          r < τ   (spreads the bottom)
    R_i = w_iou · r̂_i + Σ_{k ≠ iou} w_k · r_k,i       e.g. soft(IoU) + 0.1 · format, as the official reward
    A_i = (R_i − mean_g R) / (std_g R + eps)         over all G rows, the ground-truth row included

τ is therefore an IoU threshold: shaping the total instead (IoU + 0.1 · format) would put a well-formatted
answer on the plateau at IoU 0.7.

τ = 0.8, α = 1: r = 1.0 → 0.801823, 0.5 → 0.596390, 0 → 0.086764. Because the ground-truth row is in the group
statistics, a sample almost as good as the ground truth gets almost its advantage, instead of the sampled
rows being pushed below a mean the ground truth inflated.

Loss: GRPO's clipped surrogate (`grpo.policy_loss`), except that the ground-truth row (`offpolicy` = 1) has
importance ratio 1: its `old_logp` is its current `logp` detached, so its gradient is −A·∇logp (SFT on the
ground truth weighted by its advantage) and no clipping applies. It is never paired with the sampler
log-probs of the completion it replaced (it has none), and TIS gives it weight 1.

Where this departs from the paper / official code, and why:
- The 0.01 in the upper branch is fixed in the official code (not a hyper-parameter); kept fixed here.
- The official code samples G completions and overwrites the last; the stage samples G − 1 (same
  distribution of the G − 1 kept rows, one generation fewer).
- `reference` is a format string over the dataset's columns, so the off-policy row serves any task with a
  reference answer (e.g. `{solution}` for math), not only spans.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from posttrain.algorithms import grpo
from posttrain.datatypes import LossOutput

SPAN_REFERENCE = "<answer> {span[0]:.2f} to {span[1]:.2f} </answer>"


@dataclasses.dataclass(frozen=True)
class Args(grpo.Args):
    tau: float = dataclasses.field(
        default=0.8, metadata={"doc": "τ: rewards ≥ τ are compressed (log), below τ spread (exp)", "ge": 0}
    )
    alpha: float = dataclasses.field(
        default=1.0, metadata={"doc": "α: curvature of the exponential branch below τ", "gt": 0}
    )
    offpolicy: bool = dataclasses.field(
        default=True, metadata={"doc": "replace each group's last row by the reference answer (False: GRPO + soft advantage)"}
    )
    soft_advantage: bool = dataclasses.field(
        default=True, metadata={"doc": "apply the non-linear reward shaping before the group normalisation"}
    )
    shaped_reward: str = dataclasses.field(
        default="temporal_iou",
        metadata={"doc": "the reward (its key in `rewards`) the soft advantage shapes; the others are added as they are"},
    )
    reference: str = dataclasses.field(
        default=SPAN_REFERENCE,
        metadata={"doc": "format string over the row's columns rendering the off-policy answer (EOS is added)"},
    )


def soft_reward(rewards: torch.Tensor, tau: float = 0.8, alpha: float = 1.0) -> torch.Tensor:
    """The piecewise reward shaping of the module docstring, elementwise."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    upper = tau + 0.01 * torch.log1p((r - tau).clamp(min=0))
    lower = tau - torch.expm1(alpha * (tau - r).clamp(min=0)) / math.expm1(alpha)
    return torch.where(r >= tau, upper, lower)


def offpolicy_rows(n_rows: int, group_size: int) -> torch.Tensor:
    """`[N]` float: 1 on each group's last row (the reference answer), 0 elsewhere."""
    flags = torch.zeros(n_rows // group_size, group_size)
    flags[:, -1] = 1.0
    return flags.reshape(-1)


def render_reference(columns: dict, args: Args) -> str:
    """The off-policy answer for one dataset row (`args.reference` formatted with its columns)."""
    try:
        return args.reference.format(**columns)
    except (KeyError, IndexError, ValueError, TypeError) as err:
        raise ValueError(f"reference {args.reference!r} cannot be rendered from columns "
                         f"{sorted(columns)}: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------------------
# The RL stage's contract (stages/rl.py)


def reward_total(per_reward: dict[str, list], weights: dict[str, float], args: Args) -> torch.Tensor:
    """`[N]` R_i = Σ_k w_k · r_k,i with the `shaped_reward` component through `soft_reward` (module doc).

    `per_reward[key][i]` is reward `key` of row i (None: abstained, adds nothing, as in the Scorer's total);
    `weights[key]` its weight. Without `soft_advantage` this is the Scorer's plain weighted total.
    """
    if args.soft_advantage and args.shaped_reward not in per_reward:
        raise ValueError(f"args.shaped_reward: {args.shaped_reward!r} is not one of the stage's rewards "
                         f"{sorted(per_reward)}; name the reward the soft advantage shapes")
    n = len(next(iter(per_reward.values()))) if per_reward else 0
    total = torch.zeros(n, dtype=torch.float64)
    for key, values in per_reward.items():
        scored = torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64)
        present = torch.tensor([v is not None for v in values])
        if args.soft_advantage and key == args.shaped_reward:
            scored = soft_reward(scored, args.tau, args.alpha)
        total += torch.where(present, weights[key] * scored, torch.zeros_like(scored))
    return total


def credit(rewards: torch.Tensor, group_size: int, args: Args) -> dict[str, torch.Tensor]:
    """Group-normalised advantages of the rewards R (already shaped by `reward_total`, which the RL stage
    calls in place of the Scorer's total) with the reference row counted, and the `offpolicy` flags."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    out = {"adv": grpo.group_advantages(r, group_size, args).float()}
    out["offpolicy"] = offpolicy_rows(r.numel(), group_size) if args.offpolicy else torch.zeros(r.numel())
    return out


def loss(logp: torch.Tensor, batch: dict, args: Args) -> LossOutput:
    """`grpo.policy_loss` with ratio 1 (and TIS weight 1) on the off-policy rows."""
    off = batch["offpolicy"].bool().view(-1, 1)
    old = batch.get("old_logp", logp.detach())
    old = torch.where(off, logp.detach().to(old.dtype), old)
    rollout = torch.where(off, old, batch["rollout_logp"].to(old.dtype)) if args.tis_cap else None
    return grpo.policy_loss(
        logp, old, batch["adv"], batch["mask"], args,
        ref_logp=batch.get("ref_logp"), rollout_logp=rollout, truncated=batch.get("truncated"),
    )


reduction = grpo.reduction
needs_reference = grpo.needs_reference
