"""The stage-kind registry: what a stage of each `kind:` validates its `args` against, and what runs it.

The recipe layer only reads this table; the stages layer fills it (`posttrain/stages/__init__.py` registers
every built-in kind when it is imported, which the CLI and the pipeline do), so the schema never imports a
stage or an algorithm. A new kind is one `register_stage_kind` call.
"""

from __future__ import annotations

import dataclasses
import importlib

from posttrain.errors import UserError


@dataclasses.dataclass(frozen=True)
class StageKind:
    args: type  # the algorithm's Args dataclass
    runner: str  # "module:function": run(ctx) -> the stage's final HF checkpoint
    rl: bool = False  # args also take the shared rollout settings (RLArgs)
    judge: bool = False  # rewards are win rates from the stage's pairwise `judge` (posttrain/judges.py)
    privileged: bool = False  # needs `privileged:` (teacher prompt with privileged information)
    synthesizer: type | None = None  # TTCS: the synthesizer policy's Args (needs `synthesizer:`, takes no rewards)

    def run(self, ctx):
        module, func = self.runner.split(":")
        return getattr(importlib.import_module(module), func)(ctx)


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage_kind(name: str, kind: StageKind) -> None:
    """Make `kind: name` valid in recipes."""
    STAGE_KINDS[name] = kind


def stage_kinds() -> dict[str, StageKind]:
    """The registered kinds; an error when none are (nothing imported `posttrain.stages`)."""
    if not STAGE_KINDS:
        raise UserError("no stage kinds are registered: `import posttrain.stages` (the CLI and the pipeline do) "
                        "before loading a recipe")
    return STAGE_KINDS
