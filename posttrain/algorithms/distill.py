"""π-Distill and OPSD: distillation from the same weights conditioned on privileged information (arXiv 2602.04942).

One set of weights θ plays two roles on the SAME response tokens y = (y_1 … y_T):
    teacher  π_T = πθ(· | x, I, y_<t)      the prompt carries the privileged information I (a hint, a solution)
    student  π_S = πθ(· | x,    y_<t)      the prompt without it
`logp_T`, `logp_S` `[N, T]` are the log-probs of the response tokens under each prompt, aligned on the response
span (the stage builds them; `response_logprobs` below does the alignment), `mask` `[N, T]` marks real tokens.

π-Distill (`mode="pi_distill"`): the TEACHER samples y ~ π_T (G per prompt) and both roles learn:
    J_T = E_{π_T}[R] − β · KL(π_T ‖ sg π_S)
          KL inside the return (score function):  R̃_T = R − β Σ_t (logp_T − logp_S)   (rollout-time, constants)
          L_T = −A_T · ρ_T,   A_T = A(R̃_T),  ρ_T = exp(logp_T − old_logp_T)   (≡ 1 on-policy; PPO-clipped at ε)
    J_S = E_{π_T}[clip(ρ_S) · A] − β · KL(sg π_T ‖ π_S),   ρ_S = π_S / sg π_T,  A = A(R)
          L_S = max(−A·ρ_S, −A·clip(ρ_S, 1−ε, 1+ε)) + β · (sg logp_T − logp_S)
    loss = α · L_T + (1 − α) · L_S                     (α = 0.5, the paper's most stable mix)
  The student KL is forward KL(π_T ‖ π_S) estimated on teacher samples: the sampling distribution (sg π_T) does
  not depend on the student's gradient path, so the per-token k1 `sg logp_T − logp_S` has the exact gradient
  −∇logp_S (cross-entropy of the teacher's tokens), unlike a k1 on the sampler's own tokens.

OPSD (`mode="opsd"`): the STUDENT samples y ~ π_S (on-policy self-distillation):
    J = E_{π_S}[R] − β · KL(π_S ‖ sg π_T)
    `opsd_kl="reward"`: R̃ = R − β Σ_t (logp_S − logp_T) before the group baseline; L = clipped surrogate on A(R̃)
    `opsd_kl="full"`:   L = clipped surrogate on A(R) + β · Σ_v π_S(v) (log π_S(v) − log sg π_T(v)) per position
  A sampled k1 `logp_S − logp_T` used as a *loss term* would be wrong: its expected gradient E_{π_S}[∇logp_S] is 0,
  so it would not pull the student toward the teacher at all.

Advantages: group-relative over each prompt's G samples (`grpo.group_advantages`, unbiased std by default).
Where this departs from the paper and its code: the student's A is by default the group-normalised outcome
advantage A(R), as the paper's J_S is written (J_T's KL belongs to the teacher); `student_advantage="teacher"`
gives the student the teacher's KL-shaped advantage, as the official code does. In groups the teacher solves
every time, that advantage is −β·(KL − mean KL)/std: it pushes the student away from the teacher's correct
answers it finds least likely. ρ_S gets PPO's symmetric clip 1 ± 0.2. The official code normalises over the whole
batch; we use each prompt's group (GRPO), as for OPSD.
Everything here is pure tensor math; the stage (stages/distill.py) does the sampling and the two forwards.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from posttrain.algorithms import grpo
from posttrain.algorithms.ops import token_logprobs
from posttrain.datatypes import LossOutput, Reduction


@dataclasses.dataclass(frozen=True)
class Args:
    mode: Literal["pi_distill", "opsd"] = dataclasses.field(
        default="pi_distill", metadata={"doc": "pi_distill: teacher samples, joint loss; opsd: student samples"}
    )
    beta: float = dataclasses.field(
        default=0.1, metadata={"doc": "β: weight of the teacher/student KL (paper 0.1–0.5)", "ge": 0}
    )
    alpha: float = dataclasses.field(
        default=0.5, metadata={"doc": "π-Distill mix: α·L_teacher + (1−α)·L_student (paper: 0.5)", "ge": 0, "le": 1}
    )
    clip: float = dataclasses.field(
        default=0.2, metadata={"doc": "ε of the ratio clip (π-Distill student ratio; both modes' surrogate)",
                               "gt": 0, "lt": 1}
    )
    opsd_kl: Literal["reward", "full"] = dataclasses.field(
        default="reward",
        metadata={"doc": "OPSD KL: in the return before the baseline, or full-vocabulary per position"},
    )
    student_advantage: Literal["outcome", "teacher"] = dataclasses.field(
        default="outcome",
        metadata={"doc": "π-Distill student term: A(R) (the paper's J_S) or the teacher's KL-shaped A (official code)"},
    )
    adv_std: Literal["unbiased", "population", "none"] = dataclasses.field(
        default="unbiased", metadata={"doc": "group advantage std (see grpo.Args.adv_std)"}
    )
    adv_eps: float = dataclasses.field(default=1e-6, metadata={"doc": "added to the group std", "ge": 0})
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean"] = dataclasses.field(
        default="token-mean", metadata={"doc": "how per-token losses are reduced (global over the batch)"}
    )


# ------------------------------------------------------------------------------------------ alignment


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, starts: torch.Tensor, width: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of each row's response tokens, left-aligned: `[N, width]`.

    `logits` `[N, L, V]` of `input_ids` `[N, L]` (prompt + response, right-padded); `starts[i]` is row i's prompt
    length, so its response token t sits at input position `starts[i] + t`, predicted by the logits at
    `starts[i] + t − 1`. Positions past a row's end hold junk: multiply by the response mask.
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)  # [N, L-1], target-aligned
    return _gather_span(logp, starts, width)


def response_targets(input_ids: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's response tokens, left-aligned `[N, width]` (what `response_logits` predicts)."""
    return _gather_span(input_ids[:, 1:], starts, width)


def response_logits(logits: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """The logits that predict each row's response tokens, left-aligned: `[N, width, V]` (or any per-position
    states `[N, L, D]`, e.g. the final hidden states)."""
    index = _span_index(starts, width, logits.shape[1] - 1)
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _span_index(starts: torch.Tensor, width: int, length: int) -> torch.Tensor:
    offsets = torch.arange(width, device=starts.device)
    return (starts.view(-1, 1) - 1 + offsets).clamp(0, length - 1)


def _gather_span(values: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    return values.gather(1, _span_index(starts.to(values.device), width, values.shape[1]))


# --------------------------------------------------------------------------------------------- credit


def shaped_returns(rewards: torch.Tensor, logp_sampler: torch.Tensor, logp_other: torch.Tensor,
                   mask: torch.Tensor, beta: float) -> torch.Tensor:
    """`R − β Σ_t (logp_sampler − logp_other)`: the sampled reverse KL of the sampling role to the other role,
    inside the episode return (constants: detached). E.g. R = 1, β = 0.1, Σ KL = 2 → 0.8."""
    kl = ((logp_sampler.detach().double() - logp_other.detach().double()) * mask).sum(-1)
    return rewards.double() - beta * kl


def _adv(returns: torch.Tensor, group_size: int, args: Args) -> torch.Tensor:
    return grpo.group_advantages(returns, group_size, grpo.Args(adv_std=args.adv_std, adv_eps=args.adv_eps)).float()


def credit(rewards: torch.Tensor, group_size: int, args: Args, *, logp_teacher: torch.Tensor,
           logp_student: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row advantages `[N]` from outcome rewards `[N]` and the rollout-time response log-probs.

    π-Distill: `adv_teacher = A(R − β Σ(logp_T − logp_S))` (J_T's KL, in the return), `adv = A(R)` (J_S's;
    `student_advantage="teacher"`: the teacher's, as the official code does).
    OPSD: `adv = A(R − β Σ(logp_S − logp_T))` (`opsd_kl="reward"`) or `A(R)` (`"full"`).
    """
    if args.mode == "pi_distill":
        shaped = shaped_returns(rewards, logp_teacher, logp_student, mask, args.beta)
        teacher = _adv(shaped, group_size, args)
        student = teacher if args.student_advantage == "teacher" else _adv(rewards, group_size, args)
        return {"adv_teacher": teacher, "adv": student, "shaped_return": shaped.float()}
    if args.opsd_kl == "full":
        return {"adv": _adv(rewards, group_size, args)}
    shaped = shaped_returns(rewards, logp_student, logp_teacher, mask, args.beta)
    return {"adv": _adv(shaped, group_size, args), "shaped_return": shaped.float()}


# ----------------------------------------------------------------------------------------------- loss


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """`max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))` per token, ρ = exp(logp − sg old_logp), A `[N]` broadcast."""
    ratio = grpo.importance_ratio(logp, old_logp.detach())
    return grpo.clipped_surrogate(ratio, adv.detach().float().view(-1, 1), clip, clip)[0]


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`Σ_v π_S(v) (log π_S(v) − log sg π_T(v))` per position `[N, T]` (exact, no sampling)."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.detach().float() / temperature, -1)
    return (s.exp() * (s - t)).sum(-1)


def pi_distill_loss(logp_teacher: torch.Tensor, logp_student: torch.Tensor, batch: dict, args: Args) -> LossOutput:
    """`α·L_T + (1−α)·L_S` per token (see module doc). `batch`: `mask`, `adv_teacher`, `adv`, optional
    `logp_teacher`: the rollout-time teacher log-probs, the old policy of the teacher's ratio (default: the
    live ones detached, i.e. on-policy ρ_T ≡ 1)."""
    m = batch["mask"].bool()
    old_t = batch.get("logp_teacher", logp_teacher.detach())
    loss_t = clipped_surrogate(logp_teacher, old_t, batch["adv_teacher"], args.clip)
    ratio_s = grpo.importance_ratio(logp_student, logp_teacher.detach())
    loss_s = clipped_surrogate(logp_student, logp_teacher, batch["adv"], args.clip)
    kl_s = logp_teacher.detach() - logp_student  # forward KL(π_T‖π_S) on teacher samples
    loss_s = loss_s + args.beta * kl_s
    loss = args.alpha * loss_t + (1 - args.alpha) * loss_s
    loss = torch.where(m, loss, torch.zeros_like(loss))
    return LossOutput(loss=loss, mask=m, metrics={
        "loss_teacher": grpo._msum(loss_t, m), "loss_student": grpo._msum(loss_s, m), "kl_teacher_student": grpo._msum(kl_s, m),
        "student_ratio": grpo._msum(ratio_s, m),
        "student_clip_frac": grpo._msum((ratio_s - 1).abs() > args.clip, m),
    })


def opsd_loss(logp_student: torch.Tensor, batch: dict, args: Args, kl: torch.Tensor | None = None) -> LossOutput:
    """Clipped surrogate on the student's samples, plus `β · kl` (the per-position full-vocabulary reverse KL)
    when `opsd_kl="full"`. `batch`: `mask`, `adv`, optional rollout-time `logp_student` (the old policy of the
    ratio; default: the live log-probs detached) and `logp_teacher` (for the KL metric)."""
    m = batch["mask"].bool()
    loss = clipped_surrogate(logp_student, batch.get("logp_student", logp_student.detach()), batch["adv"], args.clip)
    metrics = {"pg_loss": grpo._msum(loss, m)}
    if args.opsd_kl == "full":
        if kl is None:
            raise ValueError("opsd_kl='full' needs the per-position reverse KL (full_reverse_kl)")
        loss = loss + args.beta * kl
        metrics["kl_student_teacher"] = grpo._msum(kl, m)
    elif "logp_teacher" in batch:
        metrics["kl_student_teacher"] = grpo._msum(logp_student.detach() - batch["logp_teacher"], m)
    loss = torch.where(m, loss, torch.zeros_like(loss))
    return LossOutput(loss=loss, mask=m, metrics=metrics)


def reduction(args: Args, max_tokens: int) -> Reduction:
    return Reduction(mode=args.loss_aggregation)


def sampler_role(args: Args) -> str:
    """Whose prompt the rollout engine samples from: the teacher's (π-Distill) or the student's (OPSD)."""
    return "teacher" if args.mode == "pi_distill" else "student"


def needs_reference(args: Args) -> bool:
    return False  # the teacher is the same weights: no frozen copy
