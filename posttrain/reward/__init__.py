"""Reward registry, Scorer and worker pool: weights, per-row verifier calls, abstention, timeouts, fallbacks.

    registry.py   names → verifier functions (`BUILTIN`, `@register`, entry points, module:function), `bind`
    scorer.py     `Scorer.score`: every verifier on every row, weights, abstention, fallbacks, `ScoreResult`
    pool.py       the spawned worker processes with a hard timeout per call
    validate.py   `check_rewards`: a recipe's rewards resolve (part of `posttrain validate`)

The verifier contract is TRL's reward-function signature, so TRL reward functions work unchanged:

    f(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float | None]

Dataset columns arrive by name as lists (`answer=[...]`); a verifier takes `**kwargs` for the ones it does not
read. `None` means abstain: that reward is left out of that row's total. Built-ins are per-row functions lifted to
this contract by `@per_row` (see `posttrain.rewards`). `workers=0` runs in-process for debugging: no isolation
and no timeouts.
"""

from posttrain.recipe.scoring import RewardSpec
from posttrain.reward.registry import BUILTIN, ENTRY_POINT_GROUP, available, bind, register, resolve
from posttrain.reward.scorer import RewardWarning, ScoreResult, Scorer
from posttrain.reward.validate import check_rewards
from posttrain.rewards import per_row

__all__ = [
    "BUILTIN", "ENTRY_POINT_GROUP", "RewardSpec", "RewardWarning", "ScoreResult", "Scorer", "available", "bind",
    "check_rewards", "per_row", "register", "resolve",
]
