"""Verifiers, registry, Scorer isolation and `posttrain score`: table-driven, CPU, no network (~10 s)."""

import argparse
import json
import os
import textwrap
import time
import warnings

import pytest

from posttrain.errors import UserError
from posttrain.reward import RewardSpec, RewardWarning, Scorer, per_row, register, resolve
from posttrain.rewards.exact import exact_reward
from posttrain.rewards.extract import extract_answer
from posttrain.rewards.format import format_reward
from posttrain.rewards.length import length_reward, overlong_penalty
from posttrain.rewards.math import math_reward
from posttrain.score import add_score_arguments, run_score


def one(fn, completion, **row):
    """Call a built-in on one row, as the Scorer does: settings as they are (partial), columns as lists."""
    ids = row.pop("completion_ids", None)
    settings = getattr(fn, "__reward_settings__", ())
    kwargs = {k: v if k in settings else [v] for k, v in row.items()}
    return fn(prompts=["p"], completions=[completion], completion_ids=[ids], **kwargs)[0]


# ------------------------------------------------------------------------------------------ built-in verifiers
@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\{1, 2\}}", r"1, \{1, 2\}"),             # one answer per box; escaped braces do not nest
    (r"\boxed{5}, so \boxed{5}", "5"),                                # a box repeated is one answer
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}}", r"\sqrt{\frac{a}{b^{2}}}"),   # nested braces
    (r"\fbox{7}", "7"),
    (r"\boxed 5$", "5"),
    ("<think>maybe \\boxed{3}</think>\n<answer>7</answer>", "7"),    # the answer tag wins over think
    ("<answer>so \\boxed{8} it is</answer>", "8"),
    ("<answer>The answer is 12.</answer>", "12"),
    ("The final answer is: **42**.", "42"),
    ("Thus the answer is $\\frac{3}{4}$.\nDone", "$\\frac{3}{4}$"),
    ("we get 1,234 apples and then -3.5", "-3.5"),                  # last number
    ("it is 3/4 of it", "3/4"),
    ("<answer>1</answer> <answer>2", "1"),                           # an unclosed tag is a truncated answer
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),                             # latex vs decimal
    ("the answer is 0.5", r"\frac{1}{2}", 1.0),
    ("<answer>1/2</answer>", r"\frac12", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3, \pi/2)", 1.0),
    (r"\boxed{-q + p}", "p - q", 1.0),                                # symbolic
    (r"\boxed{x = 5}", "5", 1.0),
    ("so she makes 18 dollars", "Janet sells 9 eggs.\n#### 18", 1.0),  # GSM8K reference, last number
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{\text{(C)}}", "C", 1.0),
    (r"\boxed{17}", "18", 0.0),                                       # wrong
    ("I do not know", "18", 0.0),                                     # nothing to extract
    (r"\boxed{3}", None, None),                                       # no reference: abstain
])
def test_math_reward(completion, answer, expected):
    assert one(math_reward, completion, answer=answer) == expected


@pytest.mark.parametrize("completion, answer, kwargs, expected", [
    ("  Paris ", "Paris", {}, 1.0),
    ("New   York\n", "New York", {}, 1.0),                          # whitespace collapsed
    ("The answer is Paris.", "Paris", {}, 1.0),                     # extracted
    (r"\boxed{Paris}", "paris", {}, 0.0),
    (r"\boxed{Paris}", "paris", {"ignore_case": True}, 1.0),
    ("Paris, France", "Paris", {}, 0.0),
    ("x", None, {}, None),
])
def test_exact_reward(completion, answer, kwargs, expected):
    assert one(exact_reward, completion, answer=answer, **kwargs) == expected


@pytest.mark.parametrize("completion, kwargs, expected", [
    ("<think>a</think><answer>b</answer>", {}, 1.0),
    ("\n<think>a\nb</think>\n\n<answer> 4 </answer>\n", {}, 1.0),
    ("<answer>b</answer>", {}, 0.0),
    ("<think>a</think><answer>b</answer> trailing", {}, 0.0),
    ("<think>a<think>b</think><answer>c</answer>", {}, 0.0),        # each tag once
    ("<answer>b</answer><think>a</think>", {}, 0.0),                 # order matters
    ("a</think><answer>b</answer>", {"prefix": "<think>"}, 1.0),     # template opened the think block
    ("<reasoning>a</reasoning><final>b</final>", {"tags": ["reasoning", "final"]}, 1.0),
    ("Answer: 42", {"pattern": r"Answer: \d+"}, 1.0),
    ("So. Answer: 42!", {"pattern": r"Answer: \d+"}, 0.0),
    ("So. Answer: 42!", {"pattern": r"Answer: \d+", "search": True}, 1.0),
])
def test_format_reward(completion, kwargs, expected):
    assert one(format_reward, completion, **kwargs) == expected


@pytest.mark.parametrize("length, max_tokens, cache, expected", [
    (18000, 20480, 4096, -0.394531),   # ALGORITHMS.md golden: (16384 - 18000) / 4096
    (16384, 20480, 4096, 0.0),         # edge of the safe zone
    (100, 20480, 4096, 0.0),
    (20480, 20480, 4096, -1.0),        # end of the window
    (20481, 20480, 4096, -1.0),        # beyond
    (18432, 20480, 4096, -0.5),
    (7, 10, 4, -0.25),                 # (6 - 7) / 4
])
def test_length_reward_golden(length, max_tokens, cache, expected):
    assert overlong_penalty(length, max_tokens, cache) == pytest.approx(expected, abs=1e-6)
    value = one(length_reward, "text", completion_ids=[0] * length, max_tokens=max_tokens, cache=cache)
    assert value == pytest.approx(expected, abs=1e-6)


def test_length_reward_defaults_are_dapo_and_need_ids():
    assert one(length_reward, "", completion_ids=[1] * 18000) == pytest.approx(-0.39453125)
    with pytest.raises(ValueError, match="completion_ids"):
        one(length_reward, "text")


# --------------------------------------------------------------------------------------------------- registry
def trl_style(prompts, completions, completion_ids, answer, **kwargs):
    """A TRL reward function: the batch contract, column `answer` by name, **kwargs for the rest."""
    return [float(c.strip() == a) if a is not None else None for c, a in zip(completions, answer)]


@register("test_brevity")
@per_row
def brevity(completion, *, limit: int = 5, **row):
    return float(len(completion) <= limit)


def raising(completions, **kwargs):
    raise ValueError("boom")


def nan_reward(completions, **kwargs):
    return [float("nan")]


def sleepy(completions, **kwargs):
    time.sleep(60)
    return [1.0]


def dies(completions, **kwargs):
    os._exit(3)


def half_abstains(completions, **kwargs):
    return [None if c.startswith("skip") else 1.0 for c in completions]


def always_abstains(completions, **kwargs):
    return [None for _ in completions]


def test_builtin_names_resolve():
    for name in ("math", "exact", "format", "length"):
        assert callable(resolve(name))


def test_unknown_name_suggests():
    with pytest.raises(UserError, match=r"unknown reward `maht` \(did you mean `math`\?\).*exact, format, length"):
        resolve("maht")
    with pytest.raises(UserError, match="has no `nope`"):
        resolve("posttrain.rewards.math:nope")
    with pytest.raises(UserError, match="cannot import"):
        resolve("no_such_module_xyz:f")
    with pytest.raises(UserError, match=r"no setting `max_token` \(did you mean `max_tokens`\?\)"):
        Scorer([RewardSpec(name="length", kwargs={"max_token": 5})], workers=0)


def test_register_plugin_and_its_settings():
    assert resolve("test_brevity") is brevity
    with pytest.raises(UserError, match="built-in"):
        register("math")(brevity)
    with Scorer([RewardSpec(name="test_brevity", kwargs={"limit": 3})], workers=0) as scorer:
        assert scorer.score(None, ["abc", "abcd"]).per_reward["test_brevity"] == [1.0, 0.0]


def test_trl_function_by_module_reference_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_trl_rewards.py").write_text(textwrap.dedent("""
        def has_answer(prompts, completions, completion_ids, answer, **kwargs):
            return [float(a in c) for c, a in zip(completions, answer)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_file = tmp_path / "sub" / "plugin.py"
    plugin_file.parent.mkdir()
    plugin_file.write_text("def shout(completions, **kw):\n    return [float(c.isupper()) for c in completions]\n")
    specs = [RewardSpec(name="my_trl_rewards:has_answer"), RewardSpec(name=f"{plugin_file}:shout"),
             RewardSpec(name=f"{__name__}:trl_style", weight=2.0)]
    columns = {"answer": ["42", "7"], "unused_column": [1, 2]}
    expected = {"has_answer": [1.0, 0.0], "shout": [0.0, 1.0], "trl_style": [0.0, 0.0]}
    for workers in (0, 1):  # in-process and through a worker process (file loaded there by path)
        with Scorer(specs, workers=workers) as scorer:
            result = scorer.score(["p", "q"], ["it is 42", "NO"], [[1, 2], [3]], columns)
        assert result.per_reward == expected
        assert result.total == [1.0, 1.0]


def test_entry_point_plugin(monkeypatch):
    from importlib.metadata import EntryPoint

    import posttrain.reward.registry as reward

    entry = EntryPoint(name="ep_exact", value="posttrain.rewards.exact:exact_reward", group=reward.ENTRY_POINT_GROUP)
    monkeypatch.setattr(reward, "_entry_points", lambda: {"ep_exact": entry})
    assert resolve("ep_exact") is exact_reward
    with pytest.raises(UserError, match="did you mean `ep_exact`"):
        resolve("ep_exakt")


def test_unpicklable_and_missing_column_are_user_errors(monkeypatch):
    import posttrain.reward.registry as reward

    monkeypatch.setitem(reward._REGISTERED, "test_local_lambda", lambda completions, **kw: [1.0])
    with pytest.raises(UserError, match="cannot be sent to a worker process"):
        Scorer(["test_local_lambda"], workers=2)
    with Scorer(["math"], workers=0) as scorer, pytest.raises(UserError, match="reads column `answer`"):
        scorer.score(None, ["x"], None, {"solution": ["1"]})


# ----------------------------------------------------------------------------------------------------- scorer
def test_abstain_is_left_out_of_the_weighting():
    specs = [RewardSpec(name=f"{__name__}:half_abstains", weight=2.0),
             RewardSpec(name="test_brevity", weight=0.5),
             RewardSpec(name=f"{__name__}:always_abstains", weight=100.0)]
    with Scorer(specs, workers=0) as scorer:
        result = scorer.score(None, ["skip this long one", "ok"])
    assert result.per_reward["half_abstains"] == [None, 1.0]
    assert result.total == [0.0, 2.0 * 1.0 + 0.5 * 1.0]   # row 0: 0.5 * 0.0 only; abstentions add nothing
    assert result.abstained == {"half_abstains": 1, "test_brevity": 0, "always_abstains": 2}
    assert result.all_abstained == [False, False]
    with Scorer([RewardSpec(name=f"{__name__}:always_abstains")], workers=0) as scorer:
        result = scorer.score(None, ["a", "b"])
    assert result.total == [0.0, 0.0] and result.all_abstained == [True, True]
    metrics = result.metrics()
    assert metrics["reward/all_abstained"] == 2.0 and "reward/always_abstains/mean" not in metrics


def test_failures_timeouts_and_nan_get_the_fallback_in_isolated_workers():
    specs = [
        RewardSpec(name=f"{__name__}:raising", fallback=-1.0),
        RewardSpec(name=f"{__name__}:nan_reward", fallback=0.25),
        RewardSpec(name=f"{__name__}:sleepy", timeout=1.0),
        RewardSpec(name=f"{__name__}:dies"),
        RewardSpec(name="test_brevity"),
    ]
    with Scorer(specs, workers=2) as scorer:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = scorer.score(None, ["a", "bb"])
        elapsed = time.perf_counter() - start
        assert scorer.score(None, ["c"]).per_reward["test_brevity"] == [1.0]  # the pool survived
    assert result.per_reward == {"raising": [-1.0, -1.0], "nan_reward": [0.25, 0.25], "sleepy": [0.0, 0.0],
                                 "dies": [0.0, 0.0], "test_brevity": [1.0, 1.0]}
    assert result.failures == {"raising": 2, "nan_reward": 2, "sleepy": 0, "dies": 2, "test_brevity": 0}
    assert result.timeouts == {"raising": 0, "nan_reward": 0, "sleepy": 2, "dies": 0, "test_brevity": 0}
    assert result.total == [-1.0 + 0.25 + 1.0] * 2
    assert elapsed < 10.0, elapsed  # two 1 s timeouts (+ worker start-up), never the 60 s sleep
    messages = [str(w.message) for w in caught if issubclass(w.category, RewardWarning)]
    assert len(messages) == 4  # once per (reward, kind), though every kind happened twice
    assert any("ValueError: boom" in m for m in messages) and any("nan" in m for m in messages)
    metrics = result.metrics()
    assert metrics["verifier/sleepy/timeouts"] == 2.0 and metrics["verifier/raising/failures"] == 2.0
    assert metrics["reward/total/mean"] == pytest.approx(0.25)


def test_in_process_mode_still_catches_exceptions_and_nan():
    specs = [RewardSpec(name=f"{__name__}:raising"), RewardSpec(name=f"{__name__}:nan_reward", fallback=None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardWarning)
        result = Scorer(specs, workers=0).score(None, ["a"])
    assert result.per_reward == {"raising": [0.0], "nan_reward": [None]}
    assert result.failures == {"raising": 1, "nan_reward": 1}


ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{" + r"\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    r"\boxed{" + r"\frac{1}{" * 30 + "2" + "}" * 30 + "}",
    r"\boxed{" + "1+" * 5000 + "1}",
    "the answer is " + "x" * 10_000,
    "<answer>" + "{" * 5000 + "</answer>",
    r"\boxed{" * 3000,
]


def test_adversarial_math_inputs_finish_in_bounded_time():
    # With the cheap guards on, these are compared as strings and return at once.
    with Scorer(["math"], workers=0) as scorer:
        start = time.perf_counter()
        result = scorer.score(None, ADVERSARIAL, None, {"answer": ["3"] * len(ADVERSARIAL)})
        assert time.perf_counter() - start < 3.0
    assert result.per_reward["math"] == [0.0] * len(ADVERSARIAL)
    # Guards off: sympy really hangs on some of them; the worker timeout bounds the call.
    spec = RewardSpec(name="math", timeout=1.5, kwargs={"max_chars": 10**6, "max_depth": 10**6})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardWarning)
        with Scorer([spec], workers=2) as scorer:
            scorer.score(None, ["\\boxed{3}"], None, {"answer": ["3"]})  # start the workers
            start = time.perf_counter()
            result = scorer.score(None, ADVERSARIAL[:3], None, {"answer": ["3"] * 3})
            elapsed = time.perf_counter() - start
    assert result.per_reward["math"] == [0.0, 0.0, 0.0]
    assert result.timeouts["math"] >= 1
    assert elapsed < 8.0, elapsed


# -------------------------------------------------------------------------------------------------------- cli
def _score_cli(*argv):
    parser = argparse.ArgumentParser()
    add_score_arguments(parser)
    return run_score(parser.parse_args([str(a) for a in argv]))


def test_score_cli_round_trip(tmp_path, capsys):
    rows = [
        {"prompt": "1+1?", "completion": r"so \boxed{2}", "answer": "2"},
        {"completion": "the answer is 0.5", "answer": r"\frac{1}{2}", "id": 7},
        {"completion": "I give up", "answer": "3"},
        {"completion": "no reference"},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "scored.jsonl"
    assert _score_cli("math", data, "--out", out, "--workers", 1) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in written] == [1.0, 1.0, 0.0, None]
    assert written[1]["id"] == 7 and written[0]["prompt"] == "1+1?"
    printed = capsys.readouterr().out
    assert "n=4 mean=0.6667 abstained=1 failures=0 timeouts=0" in printed

    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"completion": "x", "completion_ids": [0] * 18000}) + "\n")
    assert _score_cli("length", ids, "--workers", 0, "--kwargs", '{"max_tokens": 20480, "cache": 4096}') == 0
    assert "mean=-0.3945" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ('{"completion": "a", "answer": "1"}\n{"completion": "b", "answer": \n', r"rows.jsonl:2: not valid JSON"),
    ('{"completion": "a", "answer": "1"}\n[1, 2]\n', r"rows.jsonl:2: expected a JSON object"),
    ('\n{"text": "a"}\n', r"rows.jsonl:2: no `completion` field"),
    ('{"completion": "a"}\n', r"reads column `answer`"),
    ("", "no rows"),
])
def test_score_cli_bad_file_names_file_and_line(tmp_path, content, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(content)
    with pytest.raises(UserError, match=message):
        _score_cli("math", data, "--workers", 0)


def test_score_cli_bad_options(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        _score_cli("math", tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="--kwargs is not valid JSON"):
        _score_cli("length", tmp_path / "missing.jsonl", "--kwargs", "{max_tokens: 1}")
    data = tmp_path / "rows.jsonl"
    data.write_text('{"completion": "a"}\n')
    with pytest.raises(UserError, match="did you mean `exact`"):
        _score_cli("exakt", data)


def test_pure_built_ins_run_in_process_and_the_rest_in_workers():
    """`exact`, `length`, `temporal_iou` and `format` with its own tags are pure and bounded: no worker round
    trip (no pool is even started for them); `math`, a user regex and user functions keep the workers."""
    from posttrain.reward.registry import in_process

    with Scorer([RewardSpec(name="exact"), RewardSpec(name="format")], workers=2) as scorer:
        result = scorer.score(None, ["<think>a</think><answer>4</answer>"], None, {"answer": ["4"]})
        assert result.per_reward == {"exact": [1.0], "format": [1.0]} and scorer._pool is None
        assert scorer.totals["exact"]["calls"] == 1
    assert not in_process(RewardSpec(name="format", kwargs={"pattern": "(a+)+$"}))
    assert not in_process(RewardSpec(name="math")) and in_process(RewardSpec(name="temporal_iou"))
    with Scorer([RewardSpec(name="exact"), RewardSpec(name="math")], workers=1) as scorer:
        result = scorer.score(None, ["\\boxed{4}"], None, {"answer": ["4"]})
        assert result.per_reward == {"exact": [1.0], "math": [1.0]} and scorer._pool is not None
