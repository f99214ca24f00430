"""TTCS stage: a synthesizer and a solver, both from the stage's starting model, co-evolve on unlabeled test
questions. One loop step is one iteration of both:

    test questions → synthesizer samples G' variants each (`<question>` tags) → the solver answers each variant
    M times → synthesizer rewards (uncertainty bell × similarity, − diversity; algorithms/ttcs.py) → GRPO step
    of the synthesizer → solver batch = test questions + this iteration's best variants → G answers each →
    majority-vote pseudo-labels, groups outside the agreement band masked out → GRPO step of the solver
    (`solver_steps` of them per iteration, each on fresh test questions and its own share of the variants).

Only the prompt column is read: answers never enter the loop (`label_column` is read for a monitoring metric,
`ttcs/pseudo_label_accuracy`, and nothing else). Each policy has its own learner and optimizer; both live on one
Accelerator, so one checkpoint holds both (the solver's HF weights at its root, the synthesizer's under
`synthesizer/`) and `--resume` restores both. The stage's output (what the next stage starts from) is the solver.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import torch

from posttrain.algorithms import grpo, ttcs
from posttrain.data import load_rows, render_prompt
from posttrain.errors import UserError
from posttrain.evaluation.metrics import vote_key
from posttrain.learner import Learner
from posttrain.stages import rl
from posttrain.stages.context import BatchOrder, StageContext, chunks, run_loop, shard


def answer_key(text: str) -> str | None:
    """The normalised final answer a solver sample votes with (the evaluation's maj@k uses the same)."""
    from posttrain.evaluation.runner import answer_of

    return vote_key(answer_of(text))


@dataclasses.dataclass
class Questions:
    raw: list[str]  # the test questions as written (what the synthesizer rewrites)
    labels: list | None  # monitoring only (`label_column`)


def load_questions(ctx: StageContext) -> Questions:
    """The unlabeled test questions: the prompt column only (plus the monitoring column when asked)."""
    spec, label = ctx.stage.spec.data, ctx.stage.algo.label_column
    rows = load_rows(spec.path, spec.split, spec.name, spec.limit, spec.rename)
    for column in [spec.prompt_column] + ([label] if label else []):
        if column not in rows.column_names:
            raise UserError(f"dataset `{spec.path}` has no column `{column}` (columns: {', '.join(rows.column_names)})")
    return Questions(list(rows[spec.prompt_column]), list(rows[label]) if label else None)


class Policy:
    """One of the two policies: its learner, rollout engine, sampling settings and GRPO settings."""

    def __init__(self, ctx, train, args, total_steps: int, alongside: bool, prompt_length: int):
        from posttrain.rollout.base import SamplingParams, make_engine

        self.train, self.args = train, args
        self.batch_size = train.batch_size or train.prompts_per_step * train.group_size
        self.updates = train.prompts_per_step * train.group_size // self.batch_size
        self.learner = Learner(ctx.accelerator, ctx.recipe.model, train.model_copy(update={"batch_size": self.batch_size}),
                               total_steps * self.updates, ctx.init_path, alongside=alongside)
        self.engine = make_engine(ctx.stage.spec.engine, **rl.engine_options(ctx, self.learner, train, prompt_length))
        self.temperature = rl._temperature(train)
        self.sampling = lambda n, seed: SamplingParams(  # sampler log-probs: only for the TIS correction
            n=n, temperature=train.temperature, top_p=train.top_p, top_k=train.top_k,
            max_tokens=train.max_tokens, stop=tuple(train.stop), seed=seed, logprobs=args.tis_cap is not None)

    def generate(self, prompt_ids: list[list[int]], n: int, seed: int):
        return self.engine.generate(prompt_ids, self.sampling(n, seed)) if prompt_ids else []

    def update(self, prompt_ids: list[list[int]], outs, rewards: list[float], trains: list[bool], ref_model, pad_id):
        """GRPO steps on groups (`outs[k]`: G completions of `prompt_ids[k]`), then the engine weight sync."""
        t, acc = self.train, self.learner.accelerator
        credit = grpo.credit(torch.tensor(rewards, dtype=torch.float32), t.group_size, self.args)
        prompts = rl.PromptSet(prompt_ids, [""] * len(prompt_ids), {})
        groups = [rl.Group(k, cs, rewards[k * t.group_size:(k + 1) * t.group_size], {}) for k, cs in enumerate(outs)]
        rows = rl.build_rows(groups, trains, prompts, credit)
        rl._attach_logprobs(self.learner, ref_model, rows, pad_id, t.micro_batch_size, self.temperature, self.updates > 1,
                            t.padding_free)
        loss_fn = partial(rl.rl_loss, algo=grpo, args=self.args, temperature=self.temperature,
                          padding_free=t.padding_free)
        reduction = grpo.reduction(self.args, t.max_tokens)
        minis = ([rl.collate_rl([rows[i] for i in idx], pad_id) for idx in chunks(mini, t.micro_batch_size)]
                 for mini in chunks(list(range(len(rows))), self.batch_size // acc.num_processes))
        learn, _, _ = rl.update_and_sync(self.learner, self.engine, minis, loss_fn, reduction)
        return learn


class PolicyPair:
    """What `run_loop` drives: checkpoints and resumes both policies; evaluates (and exports first) the solver."""

    def __init__(self, solver: Policy, synthesizer: Policy, solver_steps: int = 1):
        self.solver, self.synthesizer, self.solver_steps = solver, synthesizer, solver_steps
        self.accelerator = solver.learner.accelerator

    def save_state(self, directory: Path) -> None:
        self.solver.learner.save_state(directory)  # both models and optimizers are registered: one state

    def load_state(self, directory: Path, step: int) -> None:
        self.accelerator.load_state(str(directory))
        self.solver.learner.step = step * self.solver.updates * self.solver_steps
        self.synthesizer.learner.step = step * self.synthesizer.updates

    def export_hf(self, directory: Path, tokenizer, merge_lora: bool) -> None:
        self.solver.learner.export_hf(directory, tokenizer, merge_lora)
        self.synthesizer.learner.export_hf(Path(directory) / "synthesizer", tokenizer, merge_lora)

    def unwrapped(self):
        return self.solver.learner.unwrapped()

    @property
    def device(self):
        return self.solver.learner.device


def _histogram(values: list[float], prefix: str) -> dict[str, tuple[float, float]]:
    n = max(len(values), 1)
    bins = {"below": sum(v < 0.25 for v in values), "band": sum(0.25 <= v <= 0.75 for v in values),
            "above": sum(v > 0.75 for v in values)}
    return {f"{prefix}/{k}": (c, n) for k, c in bins.items()}


def run(ctx: StageContext) -> Path:
    from posttrain.models import load_causal_lm

    t, args, acc = ctx.stage.train, ctx.stage.algo, ctx.accelerator
    synth_train, synth_args = ctx.stage.synthesizer
    if ctx.stage.spec.engine == "vllm_server" and ctx.stage.spec.vllm_server.urls:
        raise UserError(f"stages.{ctx.stage.name}.vllm_server.urls: TTCS trains two policies (synthesizer and solver), "
                        f"each needs its own server; leave `urls` empty and posttrain starts one per policy")
    if not t.steps:
        raise UserError(f"stages.{ctx.stage.name}.args.steps: a ttcs stage needs a number of steps (iterations)")
    if args.synthetic_per_step > t.prompts_per_step or args.synthetic_per_step % acc.num_processes:
        raise UserError(f"stages.{ctx.stage.name}.args.synthetic_per_step: {args.synthetic_per_step} must be at most "
                        f"prompts_per_step ({t.prompts_per_step}) and a multiple of {acc.num_processes} processes")
    if acc.state.deepspeed_plugin is not None:
        raise UserError(f"stages.{ctx.stage.name}: a ttcs stage trains two models on one Accelerator, which DeepSpeed "
                        f"does not support here; launch it with DDP (recipes/accelerate/ddp.yaml) and use `model.lora` "
                        f"to save memory")
    questions = load_questions(ctx)
    spec, tok, pad_id = ctx.stage.spec, ctx.tokenizer, ctx.tokenizer.pad_token_id
    render = lambda text: tok(render_prompt(tok, text, spec.data.template, spec.data.system_prompt),
                              add_special_tokens=False)["input_ids"]
    solver_ids = [render(q) for q in questions.raw]
    synth_ids = [render(spec.synthesizer.template.format(question=q)) for q in questions.raw]
    solver = Policy(ctx, t, args, t.steps * args.solver_steps, alongside=False, prompt_length=spec.data.max_length)
    synth = Policy(ctx, synth_train, synth_args, t.steps, alongside=True, prompt_length=max(map(len, synth_ids)))
    pair = PolicyPair(solver, synth, args.solver_steps)
    ref_model = None
    if args.kl_coef > 0 or synth_args.kl_coef > 0:  # both policies start from the same model: one frozen copy
        ref_model = load_causal_lm(ctx.init_path, ctx.recipe.model).to(acc.device).eval().requires_grad_(False)
    n_test = t.prompts_per_step - args.synthetic_per_step
    test_order = BatchOrder(len(questions.raw), max(n_test, 1), ctx.seed)
    fill_order = BatchOrder(len(questions.raw), max(args.synthetic_per_step, 1), ctx.seed + 7919)
    source_order = BatchOrder(len(questions.raw), synth_train.prompts_per_step, ctx.seed + 104729)
    local = lambda xs: shard(xs, acc.process_index, acc.num_processes)

    def solver_step(index: int, chosen: list[list[int]], seed: int, values: dict) -> dict:
        """One solver GRPO step (`index` counts solver steps) on test questions + `chosen` (tokenized variants)."""
        want = args.synthetic_per_step // acc.num_processes
        tests = local(test_order.batch(index))[: n_test // acc.num_processes] if n_test else []
        fill = local(fill_order.batch(index))[: want - len(chosen)]  # too few variants: more test questions
        batch_ids = [solver_ids[i] for i in tests + fill] + chosen
        is_synthetic = [False] * (len(tests) + len(fill)) + [True] * len(chosen)
        outs = solver.generate(batch_ids, t.group_size, seed)
        rewards, agreements, hits = [], [], []
        for k, answers in enumerate(outs):
            keys = [answer_key(a.text) for a in answers]
            label, agreement = ttcs.majority_vote(keys)
            rewards += ttcs.pseudo_rewards(keys, label)
            agreements.append(agreement)
            if questions.labels is not None and not is_synthetic[k]:
                i = (tests + fill)[k]
                hits.append(float(label is not None and label == vote_key(str(questions.labels[i]))))
        trains = ttcs.agreement_mask(agreements, args.agreement_low, args.agreement_high)
        learn = solver.update(batch_ids, outs, rewards, trains, ref_model, pad_id)
        counts = {"solver/reward": (sum(rewards), len(rewards)),
                  "solver/agreement": (sum(agreements), len(agreements)),
                  "solver/kept_groups": (sum(trains), len(trains)),
                  "solver/synthetic_share": (len(chosen), len(batch_ids)),
                  **_histogram(agreements, "solver/agreement_hist")}
        if questions.labels is not None:
            counts["ttcs/pseudo_label_accuracy"] = (sum(hits), len(hits))
        for key, (total, n) in counts.items():  # summed over the iteration's solver steps
            values[key] = (values.get(key, (0, 0))[0] + total, values.get(key, (0, 0))[1] + n)
        return learn

    def step_fn(step: int) -> dict:
        seed = ctx.seed * 1_000_003 + step * 101 + acc.process_index
        values: dict[str, tuple[float, float]] = {}
        began = time.perf_counter()
        # ---- synthesizer: variants of test questions, judged by the current solver
        sources = local(source_order.batch(step))
        outs = synth.generate([synth_ids[i] for i in sources], synth_train.group_size, seed)
        flat_sources = [i for i in sources for _ in range(synth_train.group_size)]
        # a variant the solver cannot read (longer than data.max_length tokens) counts as unparsable
        candidates = [ttcs.parse_question(c.text) for cs in outs for c in cs]
        candidate_ids = {c: render(c) for c in candidates if c is not None}  # the solver's prompts, tokenized once
        candidates = [c if c is not None and len(candidate_ids[c]) <= spec.data.max_length else None for c in candidates]
        parsed = [k for k, c in enumerate(candidates) if c is not None]
        judged = solver.generate([candidate_ids[candidates[k]] for k in parsed], args.judge_samples, seed + 1)
        shares = [0.0] * len(candidates)
        for k, answers in zip(parsed, judged):
            shares[k] = ttcs.judge_share([answer_key(a.text) for a in answers])
        synth_rewards, synth_stats = ttcs.synthesizer_rewards(candidates, [questions.raw[i] for i in flat_sources],
                                                              shares, args)
        synth_learn = synth.update([synth_ids[i] for i in sources], outs, synth_rewards, [True] * len(sources),
                                   ref_model, pad_id)
        values.update({f"synthesizer/{k}": (v, 1.0) for k, v in synth_stats.items()})  # mean over processes
        values["synthesizer/reward"] = (sum(synth_rewards), len(synth_rewards))
        values["synthesizer/judge_share"] = (sum(shares[k] for k in parsed), len(parsed))
        # ---- solver: test questions + the iteration's most rewarded distinct variants, pseudo-labelled;
        # `solver_steps` GRPO steps, each on fresh test questions and its own share of the variants
        want = args.synthetic_per_step // acc.num_processes
        ranked = sorted(parsed, key=lambda k: -synth_rewards[k])
        chosen, seen = [], set()
        for k in ranked:
            if len(chosen) < want * args.solver_steps and candidates[k] not in seen and synth_rewards[k] > 0:
                chosen.append(candidates[k])
                seen.add(candidates[k])
        solver_learn = {}
        for sub in range(args.solver_steps):
            share = [candidate_ids[c] for c in chosen[sub * want:(sub + 1) * want]]
            solver_learn = solver_step(step * args.solver_steps + sub, share, seed + 2 + 7 * sub, values)
        metrics = rl._reduce_means(acc, values)
        metrics.update({f"solver/{k}": v for k, v in solver_learn.items()})
        metrics.update({f"synthesizer/{k}": v for k, v in synth_learn.items()})
        metrics["loss"] = solver_learn.get("loss", 0.0)
        metrics["lr"] = solver_learn.get("lr", 0.0)
        metrics["time/iteration"] = time.perf_counter() - began
        return metrics

    try:
        return run_loop(ctx, pair, t.steps, step_fn)
    finally:
        solver.engine.close()
        synth.engine.close()
