"""Recipe loading: strict schema, file:line locations, suggestions, base inheritance, overrides, geometry."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import user_video_data
from posttrain.errors import UserError
from posttrain.recipe import check_batch_geometry, load_recipe
from posttrain.recipe.load import parse_override

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
name: t
model:
  path: some/model
stages:
  sft:
    data:
      path: data.jsonl
    args:
      lr: 1.0e-4
      batch_size: 16
      micro_batch_size: 4
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, overrides=()):
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_minimal_recipe_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    (stage,) = r.stages
    assert stage.kind == "sft" and stage.train.lr == 1e-4 and stage.algo.loss_reduction == "token-mean"
    assert stage.train.max_grad_norm == 1.0 and r.recipe.precision == "fp32"


def test_unknown_key_names_file_line_path_and_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL.replace("      lr: 1.0e-4", "      lrr: 1.0e-4"))
    msg = error_of(path)
    assert f"{path}:9: stages.sft.args.lrr: unknown key (did you mean `lr`?)" in msg


def test_unknown_top_level_and_nested_keys(tmp_path):
    text = MINIMAL.replace("name: t", "name: t\nstagez: {}").replace("  path: some/model", "  path: m\n  lora: {rank: 4}")
    msg = error_of(write(tmp_path, text))
    assert ":2: stagez: unknown key (did you mean `stages`?)" in msg
    assert ":5: model.lora.rank: unknown key (valid: alpha, dropout, r, targets, vision)" in msg


def test_wrong_type_and_range_say_what_was_expected(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL.replace("lr: 1.0e-4", "lr: -1")))
    assert ":9: stages.sft.args.lr: input should be greater than 0, got -1" in msg
    msg = error_of(write(tmp_path, MINIMAL.replace("batch_size: 16", "batch_size: many")))
    assert "stages.sft.args.batch_size: input should be a valid integer" in msg and "'many'" in msg


def test_unknown_stage_kind_suggests(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL.replace("  sft:", "  stf:")))
    assert "stages.stf: stage kind `stf` is unknown (did you mean `sft`?)" in msg


def test_model_needs_exactly_one_source(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL.replace("  path: some/model", "  dtype: bf16")))
    assert "exactly one of `path`" in msg


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    msg = error_of(write(tmp_path, "name: t\nmodel: [unclosed\n"))
    assert "YAML syntax error" in msg and ":3:" in msg or ":2:" in msg


def test_duplicate_key_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL.replace("name: t", "name: t\nname: u")))
    assert ":2: name: duplicate key" in msg


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, MINIMAL, "base.yaml")
    child = write(tmp_path, "base: base.yaml\nname: child\nstages:\n  sft:\n    args:\n      lr: 5.0e-4\n", "child.yaml")
    r = load_recipe(child, ["stages.sft.args.batch_size=32", "stages.sft.args.warmup_steps=3"])
    (stage,) = r.stages
    assert r.recipe.name == "child" and stage.train.lr == 5e-4  # child wins
    assert stage.train.micro_batch_size == 4  # inherited
    assert stage.train.batch_size == 32 and stage.train.warmup_steps == 3  # overrides win
    assert "base" not in r.raw


def test_override_error_points_at_the_override(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL), ["stages.sft.args.lrr=3e-3"])
    assert "override `stages.sft.args.lrr=3e-3`: stages.sft.args.lrr: unknown key (did you mean `lr`?)" in msg


def test_only_one_level_of_base(tmp_path):
    write(tmp_path, MINIMAL, "a.yaml")
    write(tmp_path, "base: a.yaml\nname: b\n", "b.yaml")
    msg = error_of(write(tmp_path, "base: b.yaml\nname: c\n", "c.yaml"))
    assert "only one level of `base:`" in msg


@pytest.mark.parametrize("text, expected", [("a.b=3e-3", 0.003), ("a.b=7", 7), ("a.b=true", True), ("a.b=x", "x"), ("a.b=[1,2]", [1, 2])])
def test_parse_override_values(text, expected):
    assert parse_override(text) == (("a", "b"), expected)


def test_batch_geometry_message_has_the_numbers(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL.replace("batch_size: 16", "batch_size: 20")))
    check_batch_geometry(r, 1)  # 20 = 4 × 1 × 5
    with pytest.raises(UserError) as info:
        check_batch_geometry(r, 2)
    assert ":8: stages.sft.args: batch_size 20 is not a multiple of micro_batch_size 4 × 2 processes = 8" in str(info.value)


def test_cli_exit_code_2_and_no_traceback(tmp_path):
    path = write(tmp_path, MINIMAL.replace("lr: 1.0e-4", "lrr: 1.0e-4"))
    proc = subprocess.run([sys.executable, "-m", "posttrain", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "did you mean `lr`" in proc.stderr


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(recipe, tmp_path):
    if recipe.parent.name == "accelerate":
        pytest.skip("accelerate launch config, not a recipe")
    cwd = REPO
    if recipe.parent.name == "tempsamp":  # video sets are not shipped: put annotations where the recipe expects them
        cwd = user_video_data(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "validate", str(recipe)], capture_output=True, text=True, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr


def test_missing_local_files_are_reported_at_validate(tmp_path):
    from posttrain.recipe import check_files

    r = load_recipe(write(tmp_path, MINIMAL.replace("path: data.jsonl", f"path: {tmp_path}/nope.jsonl")))
    with pytest.raises(UserError) as info:
        check_files(r)
    assert "stages.sft.data.path: `" in str(info.value) and "nope.jsonl` not found" in str(info.value)


RL = MINIMAL.replace("  sft:", "  grpo:").replace("    args:", "    rewards: [{name: exact}]\n    args:").replace(
    "      batch_size: 16\n", "      prompts_per_step: 6\n      group_size: 4\n      batch_size: 12\n")


def test_rl_geometry_and_rewards_are_checked(tmp_path):
    from posttrain.reward import check_rewards

    r = load_recipe(write(tmp_path, RL))
    check_batch_geometry(r, 1)
    check_rewards(r)
    with pytest.raises(UserError) as info:
        check_batch_geometry(r, 4)
    assert "prompts_per_step 6 is not a multiple of 4 processes" in str(info.value)
    assert "batch_size 12 is not a multiple of micro_batch_size 4 × 4 processes = 16" in str(info.value)
    msg = error_of(write(tmp_path, RL.replace("    rewards: [{name: exact}]\n", "")))
    assert "stages.grpo.rewards: a `grpo` stage needs at least one reward" in msg
    msg = error_of(write(tmp_path, MINIMAL.replace("    args:", "    rewards: [{name: exact}]\n    args:")))
    assert "stages.sft.rewards: a `sft` stage takes no rewards" in msg
    bad = load_recipe(write(tmp_path, RL.replace("{name: exact}", "{name: exakt}")))
    with pytest.raises(UserError, match=r"r.yaml:8: stages.grpo.rewards: unknown reward `exakt` \(did you mean `exact`\?\)"):
        check_rewards(bad)


def test_tempsamp_shaped_reward_must_be_one_of_the_stage_rewards(tmp_path):
    tempsamp = RL.replace("  grpo:", "  tempsamp:").replace("{name: exact}", "{name: exact}, {name: format, weight: 0.1}")
    msg = error_of(write(tmp_path, tempsamp))
    assert "stages.tempsamp.args.shaped_reward: 'temporal_iou' is not one of the stage's rewards" in msg
    assert load_recipe(write(tmp_path, tempsamp), ["stages.tempsamp.args.shaped_reward=exact"]).stages[0].algo.shaped_reward == "exact"
    assert load_recipe(write(tmp_path, tempsamp), ["stages.tempsamp.args.soft_advantage=false"])


EVAL = MINIMAL + """\
eval:
  benchmarks:
    - {bench: quickstart, limit: 20}
    - {bench: gsm8k, n: 4, k: [1, 4]}
  every: 10
"""


def test_eval_block_resolves_benchmark_specs_and_list_overrides(tmp_path):
    from posttrain.recipe.benchmark import recipe_benchmarks

    r = load_recipe(write(tmp_path, EVAL), ["eval.benchmarks.1.limit=5", "eval.benchmarks.0.max_tokens=4"])
    specs, data = recipe_benchmarks(r.recipe.eval)
    assert [s.name for s in specs] == ["quickstart", "gsm8k"] and data == {}
    assert specs[0].limit == 20 and specs[0].sampling.max_tokens == 4 and specs[0].verifier.name == "exact"
    assert specs[1].limit == 5 and specs[1].sampling.n == 4 and specs[1].metrics.k == [1, 4]
    assert "index it with 0..1" in error_of(write(tmp_path, EVAL), ["eval.benchmarks.2.limit=5"])


def test_eval_block_errors_name_the_recipe(tmp_path):
    from posttrain.recipe import check_files

    r = load_recipe(write(tmp_path, EVAL.replace("bench: gsm8k", "bench: gsm8kk")))
    with pytest.raises(UserError) as info:
        check_files(r)
    assert "eval.benchmarks.1: unknown benchmark `gsm8kk` (did you mean `gsm8k`?)" in str(info.value)
    r = load_recipe(write(tmp_path, EVAL.replace("bench: gsm8k", "bench: minerva_math")))
    with pytest.raises(UserError) as info:
        check_files(r)
    assert "r.yaml:" in str(info.value) and "give its file with `eval.benchmarks.1.data: PATH`" in str(info.value)
    msg = error_of(write(tmp_path, EVAL.replace("limit: 20", "limt: 20")))
    assert "eval.benchmarks.0.limt: unknown key (did you mean `limit`?)" in msg
