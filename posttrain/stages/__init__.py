"""THE DATAFLOW: one short loop per stage kind, registered here with the recipe layer (`recipe.kinds`), whose
`STAGE_KINDS` the recipe validates against.

Each kind names its algorithm's `Args` (validated from `stages.<name>.args`) and its `run(ctx) -> Path`
(imported lazily: it returns the stage's final HF checkpoint, which the next stage starts from).
"""

from __future__ import annotations

from posttrain.algorithms import distill, grpo, nft, sft, tempsamp, ttcs
from posttrain.recipe.kinds import STAGE_KINDS, StageKind, register_stage_kind

BUILTIN_KINDS: dict[str, StageKind] = {
    "sft": StageKind(args=sft.Args, runner="posttrain.stages.sft:run"),
    # GRPO, Dr.GRPO and DAPO are one kind: the variants are settings (see recipes/grpo/)
    "grpo": StageKind(args=grpo.Args, runner="posttrain.stages.rl:run", rl=True),
    "nft": StageKind(args=nft.Args, runner="posttrain.stages.rl:run", rl=True),
    # SPO (self-play preference optimisation): a judge's win rates are the rewards, the loss is GRPO's
    "spo": StageKind(args=grpo.Args, runner="posttrain.stages.rl:run", rl=True, judge=True),
    # TTCS: a synthesizer and a solver co-evolve on unlabeled test questions (majority-vote pseudo-labels)
    "ttcs": StageKind(args=ttcs.Args, runner="posttrain.stages.ttcs:run", rl=True, synthesizer=grpo.Args),
    # TempSamp-R1: GRPO with an off-policy reference row per group and a soft advantage (video grounding)
    "tempsamp": StageKind(args=tempsamp.Args, runner="posttrain.stages.rl:run", rl=True),
    # π-Distill and OPSD: one module, two modes (`args.mode`), the teacher is the model with privileged info
    "distill": StageKind(args=distill.Args, runner="posttrain.stages.distill:run", rl=True, privileged=True),
}
for _name, _kind in BUILTIN_KINDS.items():
    register_stage_kind(_name, _kind)

__all__ = ["STAGE_KINDS", "StageKind", "register_stage_kind"]
