"""THE DATAFLOW: one short loop per stage kind. `STAGE_KINDS` is the registry the recipe validates against.

Each kind names its algorithm's `Args` (validated from `stages.<name>.args`) and its `run(ctx) -> Path`
(imported lazily: it returns the stage's final HF checkpoint, which the next stage starts from).
"""

from __future__ import annotations

import dataclasses
import importlib

from posttrain.algorithms import distill, grpo, nft, sft, tempsamp, ttcs


@dataclasses.dataclass(frozen=True)
class StageKind:
    args: type  # the algorithm's Args dataclass
    runner: str  # "module:function"
    rl: bool = False  # args also take the shared rollout settings (RLArgs)
    judge: bool = False  # rewards are win rates from the stage's pairwise `judge` (posttrain/judges.py)
    privileged: bool = False  # needs `privileged:` (teacher prompt with privileged information)
    synthesizer: bool = False  # needs `synthesizer:` (TTCS) and takes no rewards (pseudo-labels instead)

    def run(self, ctx):
        module, func = self.runner.split(":")
        return getattr(importlib.import_module(module), func)(ctx)


STAGE_KINDS: dict[str, StageKind] = {
    "sft": StageKind(args=sft.Args, runner="posttrain.stages.sft:run"),
    # GRPO, Dr.GRPO and DAPO are one kind: the variants are settings (see recipes/grpo/)
    "grpo": StageKind(args=grpo.Args, runner="posttrain.stages.rl:run", rl=True),
    "nft": StageKind(args=nft.Args, runner="posttrain.stages.rl:run", rl=True),
    # SPO (self-play preference optimisation): a judge's win rates are the rewards, the loss is GRPO's
    "spo": StageKind(args=grpo.Args, runner="posttrain.stages.rl:run", rl=True, judge=True),
    # TTCS: a synthesizer and a solver co-evolve on unlabeled test questions (majority-vote pseudo-labels)
    "ttcs": StageKind(args=ttcs.Args, runner="posttrain.stages.ttcs:run", rl=True, synthesizer=True),
    # TempSamp-R1: GRPO with an off-policy reference row per group and a soft advantage (video grounding)
    "tempsamp": StageKind(args=tempsamp.Args, runner="posttrain.stages.rl:run", rl=True),
    # π-Distill and OPSD: one module, two modes (`args.mode`), the teacher is the model with privileged info
    "distill": StageKind(args=distill.Args, runner="posttrain.stages.distill:run", rl=True, privileged=True),
}
