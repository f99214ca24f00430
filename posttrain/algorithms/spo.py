"""SPO (Self-Play Preference Optimization; Swamy et al., ICML 2024, "A Minimaximalist Approach to RLHF"):
rewards from pairwise preferences inside a group, as pure tensor functions. Not SPPO (Wu et al. 2024), which
is a different (square) loss.

No reward model. For each prompt, G completions y_1 … y_G and a judge
    J_ij = P(y_i ≻ y_j), judged with y_i shown first, in [0, 1]
are turned into each completion's reward, its win rate against the rest of its group:
    P_ij  = ½ (J_ij + 1 − J_ji)          symmetrised over both presentation orders; P_ii = ½
    win_i = (1/(G−1)) Σ_{j≠i} P_ij       (G = 1: ½, there is no opponent)
then any policy-gradient loss: SPO defines only the reward; the stage feeds `win` to
`grpo.group_advantages` and `grpo.policy_loss`.

Properties (tested):
- P_ij + P_ji = 1, so the win rates of a group always average ½ (Σ_i win_i = G/2): Dr.GRPO's advantage is
  win − ½.
- Intransitive preferences are handled: a rock–paper–scissors cycle (A ≻ B, B ≻ C, C ≻ A) gives every
  completion ½ and so zero advantage; no reward function could rationalise it.
- A judge with a constant position bias (J_ij = Q_ij + b with Q_ij + Q_ji = 1) gives P = Q exactly: the bias
  cancels. A judge that always prefers whatever is shown first gives every pair ½.
- Judges are pluggable: `rule_preference` (1 / ½ / 0 from a verifier's scores), `bradley_terry_preference`
  (σ(s_i − s_j) from a reward model's scores), or an LLM judge served by the rollout engine, whose
  answers `matrix_from_judgments` assembles. Cost: G(G−1)/2 judgments per prompt (`pairs`), twice that to
  symmetrise (`ordered_pairs`). Rule and Bradley–Terry judges are already symmetric (J_ij + J_ji = 1), so
  symmetrising leaves them unchanged.

Where this departs from the paper, and why:
- The paper writes the preference as a skew-symmetric P(ξ, ξ') ∈ [−1, 1] (P(ξ, ξ) = 0) and averages it over
  the trajectories it is compared with; we use probabilities in [0, 1] and exclude the self-comparison. Both
  are positive affine maps of our win rate (±1 form: 2·win − 1; including self: ((G−1)·win + ½)/G), so
  std-normalised GRPO advantages are unchanged and Dr.GRPO's differ only by a constant factor.
- The paper has no LLM experiments (continuous-control tasks with standard deep-RL learners); the group
  form here (G completions per prompt, compared within the group, GRPO surrogate) is the natural LLM one.
- Symmetrisation against position bias is ours (LLM judges have one; the paper's synthetic preferences
  do not). With `symmetrize=False` the judge's J is used as given: fill it with both orders or let
  `matrix_from_judgments` complete one order as J_ji = 1 − J_ij.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Args:
    """SPO's own settings; the policy loss and its settings are GRPO's."""

    symmetrize: bool = dataclasses.field(
        default=True,
        metadata={
            "doc": "judge both orders and use P_ij = ½(J_ij + 1 − J_ji) against position bias "
            "(G(G−1) judgments per prompt; False: G(G−1)/2, trusting J_ji = 1 − J_ij)"
        },
    )


def pairs(group_size: int) -> list[tuple[int, int]]:
    """The G(G−1)/2 unordered pairs (i, j), i < j, of a group: one judgment each without symmetrisation."""
    return list(itertools.combinations(range(group_size), 2))


def ordered_pairs(group_size: int) -> list[tuple[int, int]]:
    """All G(G−1) ordered pairs (i, j), i ≠ j (i shown first): both orders of every pair, for `symmetrize`."""
    return list(itertools.permutations(range(group_size), 2))


def matrix_from_judgments(group_size: int, judgments: Mapping[tuple[int, int], float]) -> torch.Tensor:
    """The judge matrix J `[G, G]` from `{(i, j): P(y_i ≻ y_j) with y_i shown first}`.

    A pair judged in one order only is completed as J_ji = 1 − J_ij; a pair judged in neither order is an
    error, as is a value outside [0, 1] or an index outside the group. The diagonal is ½.
    """
    J = torch.full((group_size, group_size), float("nan"), dtype=torch.float64)
    J.fill_diagonal_(0.5)
    for (i, j), value in judgments.items():
        if not (0 <= i < group_size and 0 <= j < group_size) or i == j:
            raise ValueError(f"judgment ({i}, {j}) is not a pair of distinct completions of a group of {group_size}")
        value = float(value)
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(f"judgment ({i}, {j}) = {value} is not a probability in [0, 1]")
        J[i, j] = value
    for i, j in pairs(group_size):
        have_ij, have_ji = (i, j) in judgments, (j, i) in judgments
        if not (have_ij or have_ji):
            raise ValueError(f"no judgment for pair ({i}, {j}) in either order")
        if not have_ji:
            J[j, i] = 1.0 - J[i, j]
        elif not have_ij:
            J[i, j] = 1.0 - J[j, i]
    return J


def rule_preference(scores: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """J_ij = 1 if s_i > s_j, ½ if equal, 0 otherwise: `[..., G]` scores → `[..., G, G]` (e.g. a verifier's)."""
    s = _float(scores)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    return (si > sj).to(s.dtype) + 0.5 * (si == sj).to(s.dtype)


def bradley_terry_preference(scores: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """J_ij = σ(s_i − s_j): `[..., G]` scores → `[..., G, G]` (a Bradley–Terry reward model's scores)."""
    s = _float(scores)
    return torch.sigmoid(s.unsqueeze(-1) - s.unsqueeze(-2))


def symmetrize(J: torch.Tensor) -> torch.Tensor:
    """P_ij = ½(J_ij + 1 − J_ji), diagonal ½: `[..., G, G]` → `[..., G, G]` with P_ij + P_ji = 1."""
    J = _float(J)
    _check_square(J)
    return _set_diagonal(0.5 * (J + 1.0 - J.transpose(-1, -2)), 0.5)


def win_rates(P: torch.Tensor) -> torch.Tensor:
    """win_i = mean_{j≠i} P_ij: `[..., G, G]` → `[..., G]`; ½ for a group of one (no opponent)."""
    P = _float(P)
    _check_square(P)
    G = P.shape[-1]
    if G == 1:
        return torch.full(P.shape[:-1], 0.5, dtype=P.dtype, device=P.device)
    off_diagonal = P.sum(-1) - P.diagonal(dim1=-2, dim2=-1)
    return off_diagonal / (G - 1)


def group_win_rates(P_blocks: torch.Tensor) -> torch.Tensor:
    """Win rates of B groups at once: `[B, G, G]` → `[B·G]`, rows grouped contiguously as everywhere else."""
    if P_blocks.dim() != 3:
        raise ValueError(f"expected [B, G, G] preference blocks, got {tuple(P_blocks.shape)}")
    return win_rates(P_blocks).reshape(-1)


def preference_rewards(J_blocks: torch.Tensor, args: Args) -> torch.Tensor:
    """SPO rewards `[B·G]` from judge matrices `[B, G, G]` (or one `[G, G]`): symmetrise if asked, then win rates."""
    J = _float(J_blocks)
    if J.dim() == 2:
        J = J.unsqueeze(0)
    _check_square(J)
    off = ~torch.eye(J.shape[-1], dtype=torch.bool, device=J.device).expand_as(J)
    values = J[off]
    if values.isnan().any() or (values < 0).any() or (values > 1).any():
        raise ValueError("judge matrices must hold probabilities in [0, 1] off the diagonal")
    return group_win_rates(symmetrize(J) if args.symmetrize else J)


def _set_diagonal(P: torch.Tensor, value: float) -> torch.Tensor:
    eye = torch.eye(P.shape[-1], dtype=torch.bool, device=P.device)
    return torch.where(eye, torch.full_like(P, value), P)


def _check_square(P: torch.Tensor) -> None:
    if P.dim() < 2 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"expected square [..., G, G] preference matrices, got {tuple(P.shape)}")


def _float(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(torch.promote_types(x.dtype, torch.float32))
