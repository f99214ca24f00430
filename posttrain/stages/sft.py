"""SFT stage: tokenized (optionally packed) examples → micro-batches → masked NLL → learner step."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from posttrain.algorithms import sft
from posttrain.data import collate, load_data, load_rows, pack, prompt_text, tokenize_dataset
from posttrain.errors import UserError
from posttrain.learner import Learner, policy_logprobs
from posttrain.stages.context import BatchOrder, StageContext, chunks, run_loop, shard
from posttrain.video import VideoError, batch_media


def sft_loss(model, mb: dict, args: sft.Args):
    logp, _ = policy_logprobs(model, mb, 1.0)  # [n, L-1] at the completion tokens, no full-vocabulary logits
    return sft.loss(logp, mb["mask"], args)


def _splits(ctx: StageContext):
    """Train and (optional) validation rows: a split/file named in `validation`, or a seeded hold-out."""
    spec = ctx.stage.spec.data
    rows = load_data(spec)
    if spec.validation:
        is_file = Path(spec.validation).suffix in (".json", ".jsonl", ".parquet", ".csv")
        val = load_rows(spec.validation if is_file else spec.path, "train" if is_file else spec.validation, spec.name)
        return rows, val
    if spec.validation_size:
        size, n = spec.validation_size, len(rows)
        if isinstance(size, float) and size >= 1:
            raise UserError(f"stages.{ctx.stage.name}.data.validation_size: {size} is a fraction of the rows and must "
                            f"be below 1 (or give a number of rows, below {n})")
        if isinstance(size, int) and size >= n:
            raise UserError(f"stages.{ctx.stage.name}.data.validation_size: {size} rows held out of the {n} rows of "
                            f"`{spec.path}` would leave none to train on; give fewer, or a fraction such as 0.05")
        parts = rows.train_test_split(test_size=size, seed=ctx.recipe.seed)
        return parts["train"], parts["test"]
    return rows, None


def _examples(ctx: StageContext, rows, counts: dict | None = None) -> list[dict]:
    """The stage's examples; `counts` (if given) gets how many rows were skipped as bad or dropped as too long."""
    spec = ctx.stage.spec.data
    if spec.video is not None:
        return VideoExamples(ctx, rows)
    tokenized = tokenize_dataset(ctx.tokenizer, rows, spec)
    if counts is not None:
        counts.update({"data/skipped_rows": tokenized.skipped, "data/dropped_too_long": tokenized.dropped})
    examples = tokenized.examples
    return pack(examples, spec.max_length) if spec.packing else examples


class VideoExamples:
    """SFT examples with a video, built on first use: the video prompt (`video.VideoPrompts`) then the
    completion and EOS, loss on the completion. An example whose video is missing or corrupt is replaced by
    the next readable one (reported once by the video cache), so every step keeps its batch size."""

    def __init__(self, ctx: StageContext, rows):
        from posttrain.video import video_prompts

        spec = ctx.stage.spec.data
        if spec.packing:
            raise UserError(f"stages.{ctx.stage.name}.data: `packing: true` is not supported with `video:`")
        self.prompts = video_prompts(ctx.tokenizer, ctx.init_path, rows.to_list(), spec.video,
                                     lambda row: prompt_text(row, spec), spec.template, spec.system_prompt,
                                     f"dataset `{spec.path}`")
        column = spec.completion_column
        if column not in self.prompts.rows[0]:
            raise UserError(f"dataset `{spec.path}` has no column `{column}` (columns: {', '.join(self.prompts.rows[0])})")
        eos = ctx.tokenizer.eos_token
        self.completions = ctx.tokenizer([str(r[column]) + eos for r in self.prompts.rows], add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                prompt = self.prompts.get(j)
            except VideoError:
                continue
            ids = prompt.token_ids + self.completions[j]
            return {"input_ids": ids, "mask": [0] * len(prompt.token_ids) + [1] * len(self.completions[j]),
                    "media": prompt.media}
        raise UserError("no video of the SFT dataset can be read")


def collate_examples(examples: list[dict], pad_id: int) -> dict:
    """`collate`, plus the videos of rows that carry one."""
    batch = collate([{k: v for k, v in ex.items() if k != "media"} for ex in examples], pad_id)
    batch.update(batch_media([ex.get("media") for ex in examples]))
    return batch


def _padded_shard(examples: list[dict], rank: int, world: int) -> list[dict]:
    """Equal-size shards for every process (collectives must match); padding rows carry no loss token."""
    per = math.ceil(len(examples) / world)
    mine = [examples[i] for i in range(rank * per, min((rank + 1) * per, len(examples)))]
    filler = {**examples[0], "mask": [0] * len(examples[0]["mask"])}
    return mine + [filler] * (per - len(mine))


def run(ctx: StageContext) -> Path:
    train, args, acc = ctx.stage.train, ctx.stage.algo, ctx.accelerator
    train_rows, val_rows = _splits(ctx)
    counts: dict = {}
    examples = _examples(ctx, train_rows, counts)
    val_examples = _examples(ctx, val_rows) if val_rows is not None and len(val_rows) else None
    total_steps = train.steps or max(1, math.ceil(train.epochs * len(examples) / train.batch_size))
    learner = Learner(acc, ctx.recipe.model, train, total_steps, ctx.init_path)
    order = BatchOrder(len(examples), train.batch_size, ctx.seed)
    loss_fn, reduction = partial(sft_loss, args=args), sft.reduction(args)
    pad_id = ctx.tokenizer.pad_token_id

    def step_fn(step: int) -> dict:
        mine = shard(order.batch(step), acc.process_index, acc.num_processes)
        micro = [collate_examples([examples[i] for i in idx], pad_id) for idx in chunks(mine, train.micro_batch_size)]
        metrics = learner.train_step(micro, loss_fn, reduction)
        metrics["epoch"] = order.epoch_of(step + 1)
        metrics["tokens/s"] = metrics["tokens"] / max(metrics["time/update"], 1e-9)
        return metrics

    def validate_fn() -> float:
        mine = _padded_shard(val_examples, acc.process_index, acc.num_processes)
        micro = [collate_examples(c, pad_id) for c in chunks(mine, train.micro_batch_size)]
        return learner.eval_loss(micro, loss_fn, reduction)

    return run_loop(ctx, learner, total_steps, step_fn, validate_fn if val_examples else None, data_counts=counts)
