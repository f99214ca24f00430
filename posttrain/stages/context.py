"""What the pipeline hands a stage, and the parts of a stage loop every stage shares: batch order,
sharding across processes, checkpoint/resume, logging, progress."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from posttrain import checkpoint
from posttrain.errors import UserError
from posttrain.tracking import MetricsLog, progress_bar


@dataclasses.dataclass
class StageContext:
    accelerator: object
    recipe: object  # Recipe
    stage: object  # recipe.load.Stage
    index: int
    init_path: Path
    tokenizer: object
    run_dir: Path
    log: MetricsLog
    resume: bool
    evaluation: object = None  # posttrain.evaluation.training.TrainingEval when the recipe has `eval:`

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage.name

    @property
    def seed(self) -> int:
        return self.recipe.seed + 1000 * self.index


class BatchOrder:
    """Which example indices form optimizer step `step`: consecutive slices of a fresh seeded permutation
    per epoch. A pure function of (seed, step), identical on every process, so resuming needs only the
    step and any split of the batch across processes sees the same global batch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def batch(self, step: int) -> list[int]:
        out, pos = [], step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out += self._permutation(epoch)[offset : offset + take]
            pos += take
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


def shard(items: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global batch (sizes are validated to divide evenly)."""
    per = len(items) // world
    return items[rank * per : (rank + 1) * per]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def resume_step(ctx: StageContext, learner, updates_per_step: int = 1) -> int:
    """Load the stage's latest checkpoint into the learner when resuming; return the step to start at.
    `updates_per_step`: optimizer steps per loop step (RL stages take several per rollout batch)."""
    if not ctx.resume:
        return 0
    ckpt = checkpoint.latest_checkpoint(ctx.stage_dir)
    if ckpt is None:
        return 0
    state = checkpoint.read_state(ckpt)
    try:
        learner.load_state(ckpt / "learner", step=state["step"] * updates_per_step)
    except Exception as err:  # damaged in a way its file sizes do not show (checkpoint.problem checks those)
        raise UserError(f"--resume: checkpoint {ckpt} cannot be loaded ({type(err).__name__}: {err}); delete it "
                        f"to resume from the one before, or start a new run") from None
    if ctx.accelerator.is_main_process:
        print(f"[posttrain] resuming stage `{ctx.stage.name}` from {ckpt} (step {state['step']})")
    return state["step"]


def _state(ctx: StageContext, step: int, total: int, complete: bool) -> dict:
    return {"stage": ctx.stage.name, "stage_index": ctx.index, "step": step, "total_steps": total, "complete": complete}


def run_loop(ctx: StageContext, learner, total_steps: int, step_fn, validate_fn=None, updates_per_step: int = 1,
             data_counts: dict | None = None) -> Path:
    """Drive `step_fn(step) -> metrics` for the stage's steps with logging, validation, checkpoints and a
    progress bar; write and return the final HF checkpoint. A step is one optimizer step (SFT) or one
    rollout batch with `updates_per_step` optimizer steps (RL). `data_counts` (rows of the stage's data left
    out, by reason) go into metrics.jsonl once, at step 0 of a stage that starts fresh, when any is non-zero."""
    train = ctx.stage.train
    start = resume_step(ctx, learner, updates_per_step)
    ctx.log.global_step = _global_step_before(ctx) + start
    if start == 0 and any((data_counts or {}).values()):
        ctx.log.log_extra(ctx.stage.name, 0, data_counts)
    bar = progress_bar(total_steps, start, f"{ctx.stage.name}", ctx.recipe.tracking.progress and ctx.accelerator.is_main_process)
    for step in range(start, total_steps):
        began = time.perf_counter()
        metrics = step_fn(step)
        done = step + 1
        if validate_fn is not None and (done == total_steps or (train.eval_every and done % train.eval_every == 0)):
            metrics["eval/loss"] = validate_fn()
        metrics["time/step"] = time.perf_counter() - began
        if done % train.log_every == 0 or done == total_steps or "eval/loss" in metrics:
            ctx.log.log(ctx.stage.name, done, metrics)
        if ctx.evaluation is not None:
            ctx.evaluation.maybe_in_stage(learner, ctx.tokenizer, ctx.stage.name, done, total_steps)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "eval/loss", "lr") if k in metrics}, refresh=False)
        if train.save_every and done % train.save_every == 0 and done < total_steps:
            checkpoint.save(learner, ctx.tokenizer, ctx.stage_dir, f"checkpoint-{done}",
                            _state(ctx, done, total_steps, False), with_learner_state=True)
            if ctx.accelerator.is_main_process:
                checkpoint.prune(ctx.stage_dir, train.keep_last)
    bar.close()
    return checkpoint.save(learner, ctx.tokenizer, ctx.stage_dir, checkpoint.FINAL,
                           _state(ctx, total_steps, total_steps, True), with_learner_state=False)


def _global_step_before(ctx: StageContext) -> int:
    """Optimizer steps of the stages before this one (the trackers' x-axis runs across stages)."""
    total = 0
    for stage in list(ctx.recipe.stages)[: ctx.index]:
        state = checkpoint.read_state(ctx.run_dir / stage / checkpoint.FINAL)
        total += state["step"] if state else 0
    return total
