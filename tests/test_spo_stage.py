"""The SPO stage: pairwise judges (rule, reward model, LLM), their win-rate rewards, recipe validation, smoke run."""

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import recipe_dict, write_addition_data, write_recipe
from posttrain import judges, pipeline
from posttrain.algorithms import grpo, spo
from posttrain.errors import UserError
from posttrain.judges import JudgeSpec, Judgments, LLMJudge, RewardModelJudge, RuleJudge
from posttrain.recipe import load_recipe
from posttrain.reward import check_rewards
from posttrain.rollout.base import Completion
from posttrain.stages.rl import Group

REPO = Path(__file__).resolve().parents[1]
CLOSENESS = {"name": "posttrain.judges:closeness"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_addition_data(tmp_path_factory.mktemp("spo-data"))


# ------------------------------------------------------------------------------------------------ rule judge


@pytest.mark.parametrize("completion, answer, expected", [
    ("10", "10", 1.0), ("12", "10", 1 / 3), ("7", "10", 0.25), ("-3", "-1", 1 / 3), (" 10 ", 10, 1.0),
    ("\\boxed{9}", "10", 0.5), ("abc", "10", 0.0), ("10 apples", "10", 0.0), ("1e3", "10", 0.0),
    ("10", None, None), ("10", "ten", None),
])
def test_closeness_verifier(completion, answer, expected):
    (score,) = judges.closeness(completions=[completion], answer=[answer])
    assert score == (pytest.approx(expected) if expected is not None else None)


def test_rule_judge_win_rates_on_a_toy_group():
    judge = RuleJudge(JudgeSpec(kind="rule", reward=CLOSENESS), workers=0)
    # closeness to 10: [1, 1/4, 1/3, 0] → the ranking of ALGORITHMS.md's check, scores [3, 1, 2, 0]
    out = judge.judge(["10-0=", "3*3="], [["10", "7", "12", "abc"], ["9", "9", "8", "x"]], {"answer": ["10", "9"]})
    assert out.J.shape == (2, 4, 4) and out.count == 2 * 6  # G(G−1)/2 pairwise preferences per group
    assert out.J[0].tolist() == spo.rule_preference([3.0, 1.0, 2.0, 0.0]).tolist()
    win = judges.preference_rewards(out, judge.spec)
    assert win.tolist() == pytest.approx([1, 1 / 3, 2 / 3, 0, 5 / 6, 5 / 6, 1 / 3, 0])  # ties: ½ each way
    assert out.metrics == {"judge/failures": 0, "judge/timeouts": 0}


def test_rule_judge_abstentions_lose_to_every_score():
    judge = RuleJudge(JudgeSpec(kind="rule", reward={"name": "exact"}), workers=0)
    out = judge.judge(["q"], [["1", "2", "1"]], {"answer": [None]})  # `exact` abstains on a missing answer
    assert judges.preference_rewards(out, judge.spec).tolist() == [0.5] * 3
    J = judge.judge(["q", "q"], [["a"], ["b"]], {"answer": ["a", "a"]}).J  # G = 1: no opponent
    assert J.shape == (2, 1, 1) and judges.preference_rewards(Judgments(J, 0), judge.spec).tolist() == [0.5, 0.5]


def test_reward_groups_replaces_rewards_and_keeps_the_scorers_values():
    judge = RuleJudge(JudgeSpec(kind="rule", reward=CLOSENESS), workers=0)
    done = [Completion(0, [1, 2], t, None, "stop") for t in ("10", "7", "12", "abc")]
    groups = [Group(0, done, [1.0, 0.0, 0.0, 0.0], {"exact": [1.0, 0.0, 0.0, 0.0]})]
    stats = {"time/generate": 0.0}
    judges.reward_groups(judge, groups, ["10-0="], {"answer": ["10"], "prompt": ["10-0="]}, stats, seed=0)
    assert groups[0].rewards == pytest.approx([1, 1 / 3, 2 / 3, 0])
    assert groups[0].per_reward["exact"] == [1.0, 0.0, 0.0, 0.0]  # logged, not trained on
    assert groups[0].per_reward["win_rate"] == groups[0].rewards
    assert stats["judge/judgments"] == 6 and stats["judge/time"] > 0 and stats["judge/failures"] == 0
    judges.reward_groups(judge, groups, ["10-0="], {"answer": ["10"]}, stats)  # a second round adds up
    assert stats["judge/judgments"] == 12


# ------------------------------------------------------------------------------------------------- llm judge


class ScriptedEngine:
    """A rollout engine whose judge model always names the longer response, but is position-biased: shown
    first, the longer one wins 4 of 4 samples and the shorter one 2 of 4 (J = Q + ¼ with Q = ¾ / ¼)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((list(prompts), sampling))
        out = []
        for k, text in enumerate(prompts):
            a, b = re.search(r"A=(.*?);B=(.*?);", text).groups()
            votes = ["A"] * 4 if len(a) > len(b) else ["A", "B", "The answer is B", "A"]
            out.append([Completion(k, [1], v, None, "stop") for v in votes[: sampling.n]])
        return out


class PlainTokenizer:
    chat_template = None


def _scripted_judge(**settings):
    spec = JudgeSpec(kind="llm", template="Q={prompt};A={a};B={b};", render="plain", samples=4, temperature=1.0,
                     **settings)
    engine = ScriptedEngine()
    return LLMJudge(spec, engine=engine, tokenizer=PlainTokenizer()), engine


def test_llm_judge_symmetrisation_cancels_a_position_bias():
    judge, engine = _scripted_judge()
    groups = [["xxx", "x", "xx"], ["y", "yyyy", "yy"]]
    out = judge.judge(["p0", "p1"], groups, {})
    (prompts, sampling), = engine.calls  # every ordered pair of both groups in ONE generate call
    assert len(prompts) == 2 * 3 * 2 == out.count and sampling.n == 4 and sampling.temperature == 1.0
    assert prompts[0] == "Q=p0;A=xxx;B=x;"
    lengths = torch.tensor([[len(c) for c in g] for g in groups], dtype=torch.float64)
    Q = 0.5 * spo.rule_preference(lengths) + 0.25  # ¾ for the longer, ¼ for the shorter
    off = ~torch.eye(3, dtype=torch.bool).expand(2, 3, 3)
    assert torch.allclose(out.J[off], (Q + 0.25)[off])  # what the biased judge says
    assert torch.allclose(spo.symmetrize(out.J), spo.symmetrize(Q))  # the bias cancels: P = Q
    win = judges.preference_rewards(out, judge.spec)
    assert win.tolist() == pytest.approx([0.75, 0.25, 0.5, 0.25, 0.75, 0.5])
    assert out.metrics["judge/unparsed"] == 0


def test_llm_judge_without_symmetrisation_judges_each_pair_once():
    judge, engine = _scripted_judge(symmetrize=False)
    out = judge.judge(["p"], [["a", "bbb", "cc"]], {})
    (prompts, _), = engine.calls
    assert len(prompts) == out.count == 3  # G(G−1)/2, the first-listed completion shown first
    assert out.J[0, 1, 0] == pytest.approx(1 - out.J[0, 0, 1])  # completed as J_ji = 1 − J_ij
    assert judges.preference_rewards(out, judge.spec).sum() == pytest.approx(1.5)


@pytest.mark.parametrize("text, expected", [
    ("A", 1.0), ("B", 0.0), (" B.", 0.0), ("Response A is better than B", 1.0), ("Answer: B", 0.0),
    ("a or b", None), ("", None), ("AB", None),
])
def test_parse_verdict(text, expected):
    assert judges.parse_verdict(text) == expected


def test_parse_verdict_with_bracketed_verdicts():
    assert judges.parse_verdict("so: [[B]]", "[[A]]", "[[B]]") == 0.0
    assert judges.parse_verdict("[[C]]", "[[A]]", "[[B]]") is None


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, data_dir):
    from posttrain.modeling import new_model

    return new_model(tmp_path_factory.mktemp("judge-lm"), hidden=32, layers=2, heads=4, kv_heads=2,
                     max_position=256, vocab_size=300, tokenizer_corpus=[data_dir / "corpus.txt"])


def test_llm_judge_on_a_tiny_model_runs_one_batched_generate_call(tiny_chat_model):
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_tokenizer
    from posttrain.rollout.base import make_engine

    tokenizer = load_tokenizer(tiny_chat_model)
    engine = make_engine("hf", model=AutoModelForCausalLM.from_pretrained(tiny_chat_model), tokenizer=tokenizer)
    calls = []
    generate = engine.generate
    engine.generate = lambda prompts, sampling: calls.append(len(prompts)) or generate(prompts, sampling)
    spec = JudgeSpec(kind="llm", template="{prompt} A: {a} B: {b} Better?", max_tokens=3)
    judge = judges.make_judge(spec, engine=engine, tokenizer=tokenizer)  # the policy judges (no `path`)
    assert judge.prompt("1+1=", "2", "3").startswith("<|im_start|>user\n1+1= A: 2 B: 3 Better?")
    groups = [["2", "3", "11"], ["5", "5", "4"]]
    out = judge.judge(["1+1=", "2+3="], groups, {"prompt": ["1+1=", "2+3="]}, seed=0)
    assert calls == [2 * 3 * 2] and out.count == 12
    assert out.J.shape == (2, 3, 3) and out.J.dtype == torch.float64
    assert ((out.J >= 0) & (out.J <= 1)).all()
    assert 0 <= out.metrics["judge/unparsed"] <= 12
    win = judges.preference_rewards(out, spec)
    assert ((win >= 0) & (win <= 1)).all() and win.view(2, 3).sum(1).tolist() == pytest.approx([1.5, 1.5])


def test_llm_judge_from_its_own_path(tiny_chat_model):
    spec = JudgeSpec(kind="llm", path=str(tiny_chat_model), render="plain", template="{prompt}|{a}|{b}", max_tokens=2)
    judge = judges.make_judge(spec)
    out = judge.judge(["1+1="], [["2", "3"]], {})
    assert out.J.shape == (1, 2, 2) and out.count == 2


# ---------------------------------------------------------------------------------------- reward-model judge


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, data_dir):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from posttrain.modeling import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-rm")
    tokenizer = build_tokenizer([data_dir / "corpus.txt"], vocab_size=300)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen3ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("render", ["chat", "plain"])
def test_reward_model_judge_is_bradley_terry_on_batched_scores(tiny_reward_model, render):
    spec = JudgeSpec(kind="reward_model", path=str(tiny_reward_model), batch_size=2, render=render)
    judge = judges.make_judge(spec, prompt_column="question")
    assert isinstance(judge, RewardModelJudge)
    groups = [["12", "7", "123456"], ["0", "-4", "99"]]
    columns = {"question": ["5+7=", "2-6="]}
    out = judge.judge(["5+7=", "2-6="], groups, columns)
    assert out.J.shape == (2, 3, 3) and out.count == 6
    texts = judge.texts(["5+7=", "2-6="], groups, columns)
    if render == "chat":
        assert texts[0].startswith("<|im_start|>user\n5+7=<|im_end|>") and "12" in texts[0]
    else:
        assert texts[0] == "5+7=12"
    # scored alone (no padding) each text gets the score it got inside a padded batch
    alone = torch.cat([judge.scores([t]) for t in texts]).view(2, 3)
    assert torch.allclose(out.J, spo.bradley_terry_preference(alone), atol=1e-5)
    assert torch.allclose(out.J + out.J.transpose(1, 2), torch.ones(2, 3, 3, dtype=torch.float64))
    assert alone.std() > 0  # a random model still tells the texts apart


def test_reward_model_judge_needs_one_logit(tmp_path, tiny_reward_model):
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_reward_model, num_labels=2)
    Qwen3ForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_reward_model).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="num_labels=1"):
        judges.make_judge(JudgeSpec(kind="reward_model", path=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ validation


def _spo_recipe(data_dir, **stage):
    r = recipe_dict(data_dir)
    r["stages"]["spo"] = {
        "data": {"path": f"{data_dir}/train.jsonl", "template": "plain", "max_length": 16},
        "args": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "batch_size": 8, "micro_batch_size": 4,
                 "max_tokens": 4, "lr": 1e-3},
        **stage,
    }
    return r


def test_spo_stage_validates_with_grpo_args_and_optional_rewards(tmp_path, data_dir):
    resolved = load_recipe(write_recipe(tmp_path, _spo_recipe(data_dir, judge={"kind": "rule", "reward": CLOSENESS})))
    stage = resolved.stages[-1]
    assert stage.kind == "spo" and isinstance(stage.algo, grpo.Args) and stage.spec.rewards == []
    assert stage.spec.judge.kind == "rule" and stage.spec.judge.symmetrize
    check_rewards(resolved)


def test_validation_errors(tmp_path, data_dir):
    def error(recipe, overrides=()):
        with pytest.raises(UserError) as info:
            load_recipe(write_recipe(tmp_path, recipe), overrides)
        return str(info.value)

    assert "stages.spo.judge: a `spo` stage needs a pairwise judge" in error(_spo_recipe(data_dir))
    grpo_stage = _spo_recipe(data_dir, rewards=[{"name": "exact"}], judge={"kind": "llm"})
    grpo_stage["stages"]["grpo"] = grpo_stage["stages"].pop("spo")
    assert "stages.grpo.judge: a `grpo` stage takes no judge (only `spo` stages do)" in error(grpo_stage)
    sft = recipe_dict(data_dir)
    sft["stages"]["sft"]["judge"] = {"kind": "llm"}
    assert "stages.sft.judge: a `sft` stage takes no judge" in error(sft)
    assert "a `rule` judge needs `reward:`" in error(_spo_recipe(data_dir, judge={"kind": "rule"}))
    assert "`reward_model` judge needs `path:`" in error(_spo_recipe(data_dir, judge={"kind": "reward_model"}))
    msg = error(_spo_recipe(data_dir, judge={"kind": "llm", "reward": CLOSENESS, "samples": 2}))
    assert "`reward`: not a setting of a `llm` judge" in msg
    assert "it lacks {b}" in error(_spo_recipe(data_dir, judge={"kind": "llm", "template": "{prompt} {a}"}))
    assert "needs `temperature` > 0" in error(_spo_recipe(data_dir, judge={"kind": "llm", "samples": 2}))
    assert "stages.spo.judge.kind: input should be 'rule', 'reward_model' or 'llm'" in error(
        _spo_recipe(data_dir, judge={"kind": "oracle"}))
    assert re.search(r"stages.spo.judge.verdict: unknown key \(did you mean `verdict_[ab]`\?\)",
                     error(_spo_recipe(data_dir, judge={"kind": "llm", "verdict": "A"})))
    bad = load_recipe(write_recipe(tmp_path, _spo_recipe(data_dir, judge={"kind": "rule", "reward": {"name": "exakt"}})))
    with pytest.raises(UserError, match=r"stages.spo.judge.reward: unknown reward `exakt` \(did you mean `exact`\?\)"):
        check_rewards(bad)


# ------------------------------------------------------------------------------------------------- smoke run


def test_quickstart_spo_recipe_runs_two_steps_on_a_tiny_model(tmp_path, data_dir):
    overrides = [
        f"model.new={{hidden: 32, layers: 2, heads: 4, kv_heads: 2, max_position: 64, vocab_size: 300, "
        f"tokenizer_corpus: [{data_dir}/corpus.txt]}}",
        "eval=null", "tracking.progress=false",
        f"stages.sft.data.path={data_dir}/train.jsonl", "stages.sft.data.validation_size=16",
        "stages.sft.args.steps=2", "stages.sft.args.batch_size=8", "stages.sft.args.micro_batch_size=8",
        "stages.sft.args.eval_every=0", "stages.sft.args.save_every=0", "stages.sft.args.warmup_steps=0",
        f"stages.spo.data.path={data_dir}/train.jsonl",
        "stages.spo.args.steps=2", "stages.spo.args.prompts_per_step=4", "stages.spo.args.group_size=4",
        "stages.spo.args.batch_size=8", "stages.spo.args.micro_batch_size=4", "stages.spo.args.max_tokens=4",
        "stages.spo.args.save_every=0",
    ]
    resolved = load_recipe(REPO / "recipes" / "quickstart" / "spo.yaml", overrides)
    assert [s.kind for s in resolved.stages] == ["sft", "spo"]
    run_dir = tmp_path / "run"
    pipeline.run(resolved, run_dir=run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spo_records = [r for r in records if r.get("stage") == "spo" and "reward/win_rate/mean" in r]
    assert [r["step"] for r in spo_records] == [1, 2]
    last = spo_records[-1]
    for key in ("loss", "accuracy", "reward/exact/mean", "reward/closeness/mean", "judge/time", "judge/failures",
                "verifier/exact/failures", "clip_frac", "time/generate"):
        assert key in last, key
    assert last["judge/judgments"] == 4 * 6  # 4 prompts × G(G−1)/2 = 6 pairs
    # the rewards are the win rates: symmetric preferences, so every group's win rates average ½
    assert last["reward/win_rate/mean"] == pytest.approx(0.5) and last["reward/total/mean"] == pytest.approx(0.5)
    assert (run_dir / "spo" / "final" / "model.safetensors").is_file()
