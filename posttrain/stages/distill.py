"""Distillation stage (π-Distill, OPSD): the RL loop with one set of weights in two roles.

    rows → student prompt x and teacher prompt (x, I) (`privileged.template`) → the sampling role's engine
    (teacher: π-Distill, student: OPSD) → scorer → response log-probs under BOTH prompts (same tokens,
    aligned span) → credit (algorithms/distill.py) → learner steps with two forwards per micro-batch → sync.

The math is `posttrain.algorithms.distill`; sampling, scoring, sharding and logging are the RL stage's.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from pathlib import Path

import torch

from posttrain.algorithms import distill
from posttrain.algorithms.ops import chunked_reverse_kl, chunked_token_logprobs, token_logprobs
from posttrain.data import collate, load_rows, render_prompt, stack_padded, usable_rows
from posttrain.errors import UserError
from posttrain.learner import Learner, head_for_chunks
from posttrain.models import hidden_states_as_logits
from posttrain.stages import rl
from posttrain.stages.context import StageContext, chunks, run_loop

ROLES = ("student", "teacher")


def teacher_prompt(template: str, prompt: str, privileged) -> str:
    """The privileged prompt: `template` with `{prompt}` and `{privileged}` filled in."""
    return template.format(prompt=prompt, privileged=privileged)


def load_prompt_pair(ctx: StageContext) -> dict[str, rl.PromptSet]:
    """The same rows as a student PromptSet (plain prompt) and a teacher PromptSet (prompt + privileged info).
    Rows where either prompt is longer than `data.max_length` tokens are dropped from both."""
    spec, priv = ctx.stage.spec.data, ctx.stage.spec.privileged
    rows = load_rows(spec.path, spec.split, spec.name, spec.limit, spec.rename, spec.bad_rows)
    for column in (spec.prompt_column, priv.column):
        if column not in rows.column_names:
            raise UserError(f"dataset `{spec.path}` has no column `{column}` (columns: {', '.join(rows.column_names)})")
    usable = usable_rows(rows, [spec.prompt_column, priv.column], spec)
    counts = {"data/skipped_rows": rows.skipped_rows + len(rows) - len(usable)}
    prompts, privileged = rows[spec.prompt_column], rows[priv.column]
    raw = {"student": [prompts[i] for i in usable],
           "teacher": [teacher_prompt(priv.template, prompts[i], privileged[i]) for i in usable]}
    texts = {r: [render_prompt(ctx.tokenizer, p, spec.template, spec.system_prompt) for p in raw[r]] for r in ROLES}
    ids = {r: [ctx.tokenizer(x, add_special_tokens=False)["input_ids"] for x in texts[r]] for r in ROLES}
    fits = [k for k in range(len(usable)) if all(len(ids[r][k]) <= spec.max_length for r in ROLES)]
    if not fits:
        raise UserError(f"dataset `{spec.path}`: every teacher or student prompt is longer than max_length "
                        f"{spec.max_length} tokens")
    counts["data/prompts_too_long"] = len(usable) - len(fits)
    if counts["data/prompts_too_long"]:
        warnings.warn(f"dataset `{spec.path}`: {counts['data/prompts_too_long']} of {len(usable)} rows have a teacher "
                      f"or student prompt longer than max_length {spec.max_length} tokens and are left out "
                      f"(`data/prompts_too_long`)", stacklevel=2)
    keep = [usable[k] for k in fits]
    columns = {c: [rows[c][i] for i in keep] for c in rows.column_names}
    return {r: rl.PromptSet([ids[r][k] for k in fits], [texts[r][k] for k in fits], columns, counts=counts)
            for r in ROLES}


def build_pair_rows(groups, trains, prompts: dict[str, rl.PromptSet]) -> list[dict]:
    """One row per completion with the response after each role's prompt (same response tokens)."""
    rows = []
    for group, train in zip(groups, trains):
        for c in group.completions:
            rows.append({
                "ids": {r: prompts[r].ids[group.prompt] + c.token_ids for r in ROLES},
                "start": {r: len(prompts[r].ids[group.prompt]) for r in ROLES},
                "length": len(c.token_ids), "train": train, "truncated": c.finish_reason == "length",
            })
    return rows


def collate_pair(rows: list[dict], pad_id: int) -> dict:
    """Both roles' right-padded inputs (`<role>_input_ids`, `<role>_attention_mask`, `<role>_start`) and the
    response-aligned `mask` `[n, T]` plus per-row credit and rollout-time log-probs, when attached."""
    width = max(r["length"] for r in rows)
    batch = {}
    for role in ROLES:
        part = collate([{"input_ids": r["ids"][role], "mask": [0] * len(r["ids"][role])} for r in rows], pad_id)
        batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"] = part["input_ids"], part["attention_mask"]
        batch[f"{role}_start"] = torch.tensor([r["start"][role] for r in rows])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    span = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, : r["length"]] = int(r["train"])
        span[i, : r["length"]] = True
    batch["mask"], batch["span"] = mask, span  # span: the response tokens, trained or not
    for name in rows[0].get("credit", {}):
        batch[name] = torch.tensor([r["credit"][name] for r in rows], dtype=torch.float32)
    for key in ("logp_teacher", "logp_student"):
        if key in rows[0]:
            batch[key] = stack_padded([r[key] for r in rows], width)
    return batch


def role_span(model, mb: dict, role: str) -> tuple[torch.Tensor, object]:
    """One role's forward, cut to the positions that predict the response: `(logits [n, T, V], None)`, or,
    when the full logits `[n, L, V]` would exceed `learner.FULL_LOGITS_BUDGET` (real vocabularies) and the LM
    head is separable, `(final hidden states [n, T, H], head)`: the caller applies the head in chunks."""
    ids, width, start = mb[f"{role}_input_ids"], mb["mask"].shape[1], mb[f"{role}_start"]
    inputs = {"input_ids": ids, "attention_mask": mb[f"{role}_attention_mask"], "use_cache": False}
    if head_for_chunks(model, ids.numel()) is not None:
        with hidden_states_as_logits(model) as head:
            return distill.response_logits(model(**inputs).logits, start, width), head
    return distill.response_logits(model(**inputs).logits, start, width), None


def role_forward(model, mb: dict, role: str, temperature: float, span: bool = False):
    """Response-span log-probs `[n, T]` of one role (and, with `span`, `role_span`'s states and head)."""
    states, head = role_span(model, mb, role)
    targets = distill.response_targets(mb[f"{role}_input_ids"], mb[f"{role}_start"], mb["mask"].shape[1])
    if head is None:
        logp = token_logprobs(states, targets, temperature)
    else:  # 0 past each response's end, where the full path holds junk that every loss masks out
        logp = chunked_token_logprobs(states, head, targets, mb["span"], temperature)[0]
    return (logp, states, head) if span else logp


def distill_loss(model, mb: dict, args: distill.Args, temperature: float):
    """The per-token loss of one micro-batch: two forwards of the same model (teacher and student prompts)."""
    if args.mode == "pi_distill":
        logp_t = role_forward(model, mb, "teacher", temperature)
        logp_s = role_forward(model, mb, "student", temperature)
        return distill.pi_distill_loss(logp_t, logp_s, mb, args)
    if args.opsd_kl == "full":
        logp_s, states_s, head = role_forward(model, mb, "student", temperature, span=True)
        with torch.no_grad():
            states_t, _ = role_span(model, mb, "teacher")
        if head is None:
            kl = distill.full_reverse_kl(states_s, states_t, temperature)
        else:  # the two roles' hidden states through the head in chunks, never the [n, T, V] logits
            kl = chunked_reverse_kl(states_s, states_t, head, mb["span"], temperature)
        return distill.opsd_loss(logp_s, mb, args, kl)
    return distill.opsd_loss(role_forward(model, mb, "student", temperature), mb, args)


def _attach_role_logprobs(learner, rows: list[dict], pad_id: int, micro: int, temperature: float) -> None:
    """Rollout-time response log-probs under both prompts (no gradient), for the credit and the metrics."""
    for chunk in chunks(list(range(len(rows))), micro):
        mb = collate_pair([rows[i] for i in chunk], pad_id)
        for role in ROLES:
            (logp,) = learner.forward_no_grad([mb], partial(role_forward, role=role, temperature=temperature))
            for i, row in zip(chunk, logp):
                rows[i][f"logp_{role}"] = row[: rows[i]["length"]].float().cpu()


def run(ctx: StageContext) -> Path:
    from posttrain.rollout.base import make_engine

    t, args, acc = ctx.stage.train, ctx.stage.algo, ctx.accelerator
    if not t.steps:
        raise UserError(f"stages.{ctx.stage.name}.args.steps: distillation stages need a number of steps")
    batch_size = t.batch_size or t.prompts_per_step * t.group_size
    prompts = load_prompt_pair(ctx)
    updates_per_step = t.prompts_per_step * t.group_size // batch_size
    learner = Learner(acc, ctx.recipe.model, t.model_copy(update={"batch_size": batch_size}),
                      t.steps * updates_per_step, ctx.init_path)
    engine = make_engine(ctx.stage.spec.engine, **rl.engine_options(ctx, learner))
    scorer = rl.stage_scorer(ctx)
    sampler = rl.Sampler(ctx, engine, scorer, prompts[distill.sampler_role(args)])
    pad_id, temperature = ctx.tokenizer.pad_token_id, rl._temperature(t)
    loss_fn = partial(distill_loss, args=args, temperature=temperature)
    reduction = distill.reduction(args, t.max_tokens)
    per_rank = batch_size // acc.num_processes

    def step_fn(step: int) -> dict:
        groups, trains = sampler.sample(step)
        rows = build_pair_rows(groups, trains, prompts)
        start = time.perf_counter()
        _attach_role_logprobs(learner, rows, pad_id, t.micro_batch_size, temperature)
        time_logprobs = time.perf_counter() - start
        width = max(r["length"] for r in rows)
        mask = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            mask[i, : r["length"]] = 1.0
        logp = {role: stack_padded([r[f"logp_{role}"] for r in rows], width) for role in ROLES}
        rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float32)
        credit = distill.credit(rewards, t.group_size, args, logp_teacher=logp["teacher"],
                                logp_student=logp["student"], mask=mask)
        for k, row in enumerate(rows):
            row["credit"] = {name: float(values[k]) for name, values in credit.items() if name != "shaped_return"}
        minis = ([collate_pair([rows[i] for i in idx], pad_id) for idx in chunks(mini, t.micro_batch_size)]
                 for mini in chunks(list(range(len(rows))), per_rank))
        learn, time_update, time_sync = rl.update_and_sync(learner, engine, minis, loss_fn, reduction)
        metrics = {**learn, **rl._rollout_metrics(acc, sampler.first, sampler.results, sampler.stats)}
        sampled_kl = ((logp["teacher"] - logp["student"]) * mask).sum(-1)
        metrics["distill/teacher_minus_student_logp"] = float(sampled_kl.mean())
        if "shaped_return" in credit:
            metrics["distill/shaped_return"] = float(credit["shaped_return"].mean())
        metrics.update({"time/logprobs": time_logprobs, "time/update": time_update, "time/sync": time_sync})
        return metrics

    try:
        return run_loop(ctx, learner, t.steps, step_fn, updates_per_step=updates_per_step,
                        data_counts=prompts["student"].counts)
    finally:
        rl.finish_scorer(ctx, scorer)
        engine.close()
