"""`posttrain validate`'s reward check: every reward of a recipe resolves and takes its settings."""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.recipe import Resolved
from posttrain.reward.scorer import Scorer


def check_rewards(resolved: Resolved) -> None:
    """Every reward (and every rule judge's verifier) resolves (built-in, registered, entry point or
    module:function) and takes the settings given in its `kwargs`. Starts no worker process."""
    problems = []
    for stage in resolved.stages:
        if not stage.spec.rewards:
            continue
        try:
            Scorer(stage.spec.rewards).close()
        except UserError as err:
            problems.append(f"{resolved.locate('stages', stage.name, 'rewards')}: stages.{stage.name}.rewards: {err}")
    for stage in resolved.stages:  # a rule judge's verifier
        judge = getattr(stage.spec, "judge", None)
        if judge is None or judge.reward is None:
            continue
        try:
            Scorer([judge.reward]).close()
        except UserError as err:
            problems.append(f"{resolved.locate('stages', stage.name, 'judge', 'reward')}: "
                            f"stages.{stage.name}.judge.reward: {err}")
    if problems:
        raise UserError("\n".join(problems))
