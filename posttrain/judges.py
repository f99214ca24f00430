"""Pairwise judges for SPO (self-play preference optimisation, Swamy et al. 2024): for each prompt's group of G
completions, the judge matrix

    J [G, G],   J_ij = P(completion i ≻ completion j | prompt), completion i shown first; J_ii = ½ (ignored)

which `posttrain.algorithms.spo` turns into each completion's reward, its win rate against the rest of its group
(`preference_rewards`: P_ij = ½(J_ij + 1 − J_ji) when `symmetrize`, then win_i = mean_{j≠i} P_ij).
Three kinds, chosen by `JudgeSpec.kind` (a recipe's `stages.<name>.judge`):

  rule          any verifier (built-in, registered or `module:function`) scores each completion through the same
                `Scorer` as stage rewards (worker processes, timeouts, fallbacks); J_ij = 1 / ½ / 0 as
                s_i >, =, < s_j (`spo.rule_preference`). A completion the verifier abstains on (None) loses to
                every scored one and ties with the other unscored ones.
  reward_model  an `AutoModelForSequenceClassification` with one logit scores prompt + completion in batches;
                J_ij = σ(s_i − s_j) (Bradley–Terry, `spo.bradley_terry_preference`).
  llm           a language model is asked which of two responses is better, through a rollout engine: by
                default the policy itself with the stage's own engine (self-judging), or a separate frozen
                model from `path`. Greedy (`temperature: 0`) or `samples` sampled verdicts averaged; a reply
                holding neither `verdict_a` nor `verdict_b` counts ½ (`judge/unparsed`). Every pair of every
                group of a sampling round goes to the engine in ONE `generate` call: G(G−1) ordered pairs per
                group with `symmetrize` (both presentation orders, against position bias), G(G−1)/2 without
                (then J_ji = 1 − J_ij).

Cost per prompt: G(G−1)/2 pairwise judgments, G(G−1) to symmetrise an llm judge. Rule and reward-model judges
are symmetric by construction (J_ij + J_ji = 1, so `symmetrize` changes nothing) and need only G scorings,
from which all G(G−1)/2 preferences follow.

Wiring (the `spo` stage kind = the shared RL loop of `posttrain.stages.rl` with GRPO's loss and `args`; SPO's
one setting, `symmetrize` (`spo.Args`), is the judge's, since it says how the judge is asked): after the
stage's scorer has run, `reward_groups` replaces each group's rewards with its win rates. `per_reward` keeps
the scorer's values (an `spo` stage's `rewards:` are optional and only logged: `reward/<key>/mean`, and
`accuracy` from the first; with none, `accuracy` is the mean win rate, ½) and gains `win_rate`. The rewards'
weights and totals play no part in training. Metrics added per step: `reward/win_rate/mean`,
`judge/judgments`, `judge/time` (seconds), and `judge/failures` / `judge/timeouts` (rule: its verifier's) or
`judge/unparsed` (llm: verdict samples that named neither response).

`closeness` is a verifier for numeric answers (1 / (1 + |x − answer|)): as a rule judge it prefers the answer
closer to the truth, which gives a learning signal between two wrong answers that exact match cannot.

Importing this module is cheap (no torch): verifier workers load it for `closeness`. `JudgeSpec`, the recipe's
`judge:` block, lives in `posttrain.recipe.scoring` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from posttrain.errors import UserError
from posttrain.recipe.scoring import DEFAULT_TEMPLATE, JudgeSpec
from posttrain.rewards import per_row
from posttrain.rewards.extract import extract_answer

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from posttrain.rollout.base import Completion

__all__ = [
    "DEFAULT_TEMPLATE", "Judge", "JudgeSpec", "Judgments", "LLMJudge", "RewardModelJudge", "RuleJudge",
    "closeness", "for_stage", "make_judge", "parse_verdict", "preference_rewards", "reward_groups",
]

# ------------------------------------------------------------------------------------------------- protocol


@dataclasses.dataclass
class Judgments:
    """What a judge returns for B groups of G completions."""

    J: "torch.Tensor"  # [B, G, G] float64: J_ij = P(i ≻ j), i shown first; diagonal ½
    count: int  # pairwise judgments made (see the module doc)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # counters, summed over a step's calls


class Judge(Protocol):
    """A pairwise judge. `prompts`: the prompt text each group's policy saw (rendered); `groups`: B lists of G
    completions (texts or rollout `Completion`s, whose token ids reach a rule judge's verifier); `columns`: the
    dataset columns, one value per group (e.g. `answer`, the raw `prompt`)."""

    spec: JudgeSpec

    def judge(self, prompts: Sequence[str], groups: Sequence[Sequence], columns: dict[str, list],
              seed: int | None = None) -> Judgments: ...

    def close(self) -> None: ...


def preference_rewards(judgments: Judgments, spec: JudgeSpec) -> "torch.Tensor":
    """Each completion's win rate in its group `[B·G]` (symmetrised when `spec.symmetrize`)."""
    from posttrain.algorithms import spo

    return spo.preference_rewards(judgments.J, spo.Args(symmetrize=spec.symmetrize))


def reward_groups(judge: Judge, groups: list, prompts: Sequence[str], columns: dict[str, list],
                  stats: dict[str, float], seed: int | None = None) -> None:
    """The SPO hook of the RL loop: replace each `Group`'s rewards by its win rates, in place; add `win_rate` to
    its `per_reward` (the scorer's values stay, for logging) and the judge's counters to `stats`."""
    if not groups:
        return
    start = time.perf_counter()
    judgments = judge.judge(prompts, [g.completions for g in groups], columns, seed)
    win = preference_rewards(judgments, judge.spec).tolist()
    G = len(groups[0].completions)
    for k, group in enumerate(groups):
        group.rewards = win[k * G : (k + 1) * G]
        group.per_reward = {**group.per_reward, "win_rate": list(group.rewards)}
    for key, value in {"judge/judgments": judgments.count, "judge/time": time.perf_counter() - start,
                       **judgments.metrics}.items():
        stats[key] = stats.get(key, 0.0) + value


# ------------------------------------------------------------------------------------------------- building


def make_judge(spec: JudgeSpec, *, engine=None, tokenizer=None, device=None, prompt_column: str = "prompt",
               dtype: str = "fp32", trust_remote_code: bool = False) -> Judge:
    """The judge `spec` describes. `engine`/`tokenizer`: the policy's, for an llm judge without `path`;
    `device`: where a judge model from `path` runs; `prompt_column`: the dataset column holding the user's
    message (what `{prompt}` and a chat-rendered reward model see)."""
    if spec.kind == "rule":
        return RuleJudge(spec)
    common = dict(device=device, prompt_column=prompt_column, dtype=spec.dtype or dtype,
                  trust_remote_code=trust_remote_code)
    if spec.kind == "reward_model":
        return RewardModelJudge(spec, **common)
    return LLMJudge(spec, engine=engine, tokenizer=tokenizer, **common)


def for_stage(ctx, engine) -> Judge | None:
    """The judge of an RL stage (`stages.<name>.judge`), or None when it has none."""
    spec = getattr(ctx.stage.spec, "judge", None)
    if spec is None:
        return None
    model = ctx.recipe.model
    return make_judge(spec, engine=engine, tokenizer=ctx.tokenizer, device=ctx.accelerator.device,
                      prompt_column=ctx.stage.spec.data.prompt_column, dtype=model.dtype,
                      trust_remote_code=model.trust_remote_code)


# ------------------------------------------------------------------------------------------------------ rule


class RuleJudge:
    """J_ij = 1 / ½ / 0 as the verifier scores s_i >, =, < s_j; None (abstained) scores lose to every number."""

    def __init__(self, spec: JudgeSpec, workers: int = 2):
        from posttrain.reward import Scorer

        self.spec, self.key = spec, spec.reward.key
        self.scorer = Scorer([spec.reward], workers=workers)

    def scores(self, prompts, groups, columns) -> tuple[list[float | None], Any]:
        """The verifier's score of every completion `[B·G]` (group-major) and its `ScoreResult`."""
        B, G = _shape(groups)
        result = self.scorer.score(
            [p for p in prompts for _ in range(G)], [_text(c) for cs in groups for c in cs],
            _ids(groups), {k: [v[b] for b in range(B) for _ in range(G)] for k, v in columns.items()},
        )
        return result.per_reward[self.key], result

    def judge(self, prompts, groups, columns, seed=None) -> Judgments:
        import torch

        from posttrain.algorithms import spo

        B, G = _shape(groups)
        values, result = self.scores(prompts, groups, columns)
        s = torch.tensor([-math.inf if v is None else v for v in values], dtype=torch.float64).view(B, G)
        return Judgments(spo.rule_preference(s), B * G * (G - 1) // 2,
                         {"judge/failures": result.failures[self.key], "judge/timeouts": result.timeouts[self.key]})

    def close(self) -> None:
        self.scorer.close()


@per_row
def closeness(completion: str, answer, **row) -> float | None:
    """1 / (1 + |x − answer|) for the completion's number x: 1 when right, ½ when one off, …; 0.0 when the
    (extracted, else whole) completion is not a number; None (abstain) when `answer` is missing or not a number.
    Strict like `exact`: closeness is 1 exactly when exact match is."""
    truth = _number(answer)
    if truth is None:
        return None
    found = extract_answer(completion, last_number_fallback=False)
    x = _number(completion if found is None else found)
    return 0.0 if x is None else 1.0 / (1.0 + abs(x - truth))


_NUMERIC = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _number(value) -> float | None:
    text = "" if value is None else str(value).strip()
    return float(text) if _NUMERIC.fullmatch(text) else None


# ---------------------------------------------------------------------------------------------- reward model


class RewardModelJudge:
    """J_ij = σ(s_i − s_j) from a sequence-classification reward model's scores of prompt + completion."""

    def __init__(self, spec: JudgeSpec, *, device=None, prompt_column: str = "prompt", dtype: str = "fp32",
                 trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        from posttrain.models import load_tokenizer, torch_dtype

        self.spec, self.prompt_column = spec, prompt_column
        self.tokenizer = load_tokenizer(spec.path, trust_remote_code)
        self.tokenizer.truncation_side = "left"  # a long row keeps the end of its completion
        if spec.render == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"judge `{spec.path}`: its tokenizer has no chat template; set `render: plain`")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
        except OSError as err:
            raise UserError(f"judge: cannot load a reward model from `{spec.path}`: {err}") from None
        if model.config.num_labels != 1:
            raise UserError(f"judge `{spec.path}`: a reward model has one output logit (num_labels=1), "
                            f"this one has {model.config.num_labels}")
        if model.config.pad_token_id is None:  # needed to find each row's last token in a padded batch
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device or "cpu").eval().requires_grad_(False)

    def texts(self, prompts, groups, columns) -> list[str]:
        """What the reward model reads, one per completion: the user's message and the completion as a chat
        (`render: chat`), or the policy's prompt text followed by the completion (`plain`)."""
        if self.spec.render == "plain":
            return [p + _text(c) for p, cs in zip(prompts, groups) for c in cs]
        questions = _questions(prompts, columns, self.prompt_column)
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": _text(c)}], tokenize=False)
            for q, cs in zip(questions, groups) for c in cs
        ]

    def scores(self, texts: list[str]) -> "torch.Tensor":
        """The reward model's score of each text `[n]` (float64), `batch_size` rows per forward pass."""
        import torch

        out, device = [], next(self.model.parameters()).device
        for start in range(0, len(texts), self.spec.batch_size):
            enc = self.tokenizer(texts[start : start + self.spec.batch_size], padding=True, truncation=True,
                                 max_length=self.spec.max_length, add_special_tokens=self.spec.render == "plain",
                                 return_tensors="pt")
            with torch.no_grad():
                logits = self.model(input_ids=enc["input_ids"].to(device),
                                    attention_mask=enc["attention_mask"].to(device)).logits
            out.append(logits[:, 0].double().cpu())
        return torch.cat(out)

    def judge(self, prompts, groups, columns, seed=None) -> Judgments:
        from posttrain.algorithms import spo

        B, G = _shape(groups)
        s = self.scores(self.texts(prompts, groups, columns)).view(B, G)
        return Judgments(spo.bradley_terry_preference(s), B * G * (G - 1) // 2)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------------- llm


class LLMJudge:
    """Asks a language model "A or B?" for every (ordered) pair, all in one `generate` call, and averages its
    verdicts: 1 for `verdict_a` (the first response wins), 0 for `verdict_b`, ½ for neither."""

    def __init__(self, spec: JudgeSpec, *, engine=None, tokenizer=None, device=None, prompt_column: str = "prompt",
                 dtype: str = "fp32", trust_remote_code: bool = False):
        self.spec, self.prompt_column = spec, prompt_column
        if spec.path is not None:  # a separate, frozen judge model served by its own HF engine
            from transformers import AutoModelForCausalLM

            from posttrain.models import load_tokenizer, torch_dtype
            from posttrain.rollout.base import make_engine

            tokenizer = load_tokenizer(spec.path, trust_remote_code)
            try:
                model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype(dtype),
                                                             trust_remote_code=trust_remote_code)
            except OSError as err:
                raise UserError(f"judge: cannot load a model from `{spec.path}`: {err}") from None
            engine = make_engine("hf", model=model.to(device or "cpu").eval().requires_grad_(False),
                                 tokenizer=tokenizer)
        elif engine is None or tokenizer is None:
            raise ValueError("an llm judge without `path` is the policy: pass its rollout engine and tokenizer")
        if spec.render == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("judge: the judge model's tokenizer has no chat template; set `render: plain`")
        self.engine, self.tokenizer = engine, tokenizer

    def prompt(self, question: str, a: str, b: str) -> str:
        """The judge prompt for one ordered pair: the template filled in one pass (so braces in the texts are
        never read as placeholders), rendered for the judge model."""
        from posttrain.data import render_prompt

        values = {"prompt": question, "a": a, "b": b}
        text = re.sub(r"\{(prompt|a|b)\}", lambda m: values[m.group(1)], self.spec.template)
        return render_prompt(self.tokenizer, text, self.spec.render, self.spec.system_prompt)

    def judge(self, prompts, groups, columns, seed=None) -> Judgments:
        import torch

        from posttrain.algorithms import spo
        from posttrain.rollout.base import SamplingParams

        B, G = _shape(groups)
        order = spo.ordered_pairs(G) if self.spec.symmetrize else spo.pairs(G)
        asks = [(b, i, j) for b in range(B) for i, j in order]
        questions = _questions(prompts, columns, self.prompt_column)
        texts = [self.prompt(questions[b], _text(groups[b][i]), _text(groups[b][j])) for b, i, j in asks]
        sampling = SamplingParams(n=self.spec.samples, temperature=self.spec.temperature,
                                  max_tokens=self.spec.max_tokens, seed=seed, logprobs=False)
        replies = self.engine.generate(texts, sampling) if texts else []
        found, unparsed = {}, 0
        for (b, i, j), samples in zip(asks, replies):
            verdicts = [parse_verdict(s.text, self.spec.verdict_a, self.spec.verdict_b) for s in samples]
            unparsed += sum(v is None for v in verdicts)
            found.setdefault(b, {})[(i, j)] = sum(0.5 if v is None else v for v in verdicts) / len(verdicts)
        J = torch.stack([spo.matrix_from_judgments(G, found.get(b, {})) for b in range(B)])
        return Judgments(J, len(asks), {"judge/unparsed": unparsed})

    def close(self) -> None:
        pass


def parse_verdict(text: str, verdict_a: str = "A", verdict_b: str = "B") -> float | None:
    """1.0 when `verdict_a` occurs first in `text`, 0.0 when `verdict_b` does, None when neither occurs. A verdict
    that starts or ends with a word character must stand alone there ("A" is not found in "Answer")."""
    hits = []
    for verdict, value in ((verdict_a, 1.0), (verdict_b, 0.0)):
        match = _verdict_pattern(verdict).search(text)
        if match:
            hits.append((match.start(), -len(verdict), value))
    return min(hits)[2] if hits else None


def _verdict_pattern(verdict: str) -> re.Pattern:
    left = r"(?<!\w)" if re.match(r"\w", verdict[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", verdict[-1]) else ""
    return re.compile(left + re.escape(verdict) + right)


# -------------------------------------------------------------------------------------------------- helpers


def _shape(groups) -> tuple[int, int]:
    sizes = {len(cs) for cs in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"a judge needs groups of one common, non-zero size, got sizes {sorted(sizes)}")
    return len(groups), sizes.pop()


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion.text


def _ids(groups) -> list | None:
    ids = [getattr(c, "token_ids", None) for cs in groups for c in cs]
    return None if any(i is None for i in ids) else ids


def _questions(prompts, columns: dict[str, list], prompt_column: str) -> list[str]:
    """The user's message of each group: the raw dataset prompt when it is a string, else the rendered prompt."""
    raw = columns.get(prompt_column)
    if raw is None:
        return list(prompts)
    return [q if isinstance(q, str) else p for q, p in zip(raw, prompts)]
