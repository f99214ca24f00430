"""Frictions a new user hit: every shipped launch line validates as written, batch-geometry messages name
values that work, `module:function` rewards import from the current directory, and local model paths that
are not models say what is wrong."""

import os
import shlex
import sys
from pathlib import Path

import pytest

from helpers import user_video_data
from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.recipe.schema import RLArgs, TrainArgs, geometry_problems

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


# ------------------------------------------------------------------------------------------ launch lines


def launch_commands(recipe: Path) -> list[list[str]]:
    """The `posttrain train` commands in a recipe's opening comment, as argument lists (`\\` continues a line)."""
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    joined = "\n".join(header).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if "posttrain train" not in line:  # prose (which may hold apostrophes)
            continue
        words = shlex.split(line)
        for i in range(len(words) - 1):
            if words[i] == "posttrain" and words[i + 1] == "train":
                commands.append(words)
                break
    return commands


def validate_argv(words: list[str]) -> tuple[list[str], int]:
    """`[accelerate launch ... --num_processes N] posttrain train RECIPE k=v ...` → the arguments of
    `posttrain validate RECIPE k=v ... --num-processes N`, and N (1 when not given)."""
    at = next(i for i in range(len(words) - 1) if words[i] == "posttrain" and words[i + 1] == "train")
    processes = 1
    for i, word in enumerate(words[:at]):
        if word == "--num_processes":
            processes = int(words[i + 1])
        elif word.startswith("--num_processes="):
            processes = int(word.split("=", 1)[1])
    recipe, rest = words[at + 2], words[at + 3:]
    overrides, skip = [], False
    for word in rest:
        if skip:
            skip = False
        elif word.startswith("--"):
            skip = "=" not in word  # an option with its value (--run-dir DIR)
        elif "=" in word:
            overrides.append(word)
    return ["validate", recipe, *overrides, "--num-processes", str(processes)], processes


def test_launch_lines_parse():
    words = shlex.split("accelerate launch --multi_gpu --num_processes 2 -m posttrain train r.yaml a.b=1 "
                        "--run-dir out c.d=[x]")
    assert validate_argv(words) == (["validate", "r.yaml", "a.b=1", "c.d=[x]", "--num-processes", "2"], 2)
    assert validate_argv(shlex.split("OMP_NUM_THREADS=1 posttrain train r.yaml"))[1] == 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_launch_line_validates_as_written(recipe, tmp_path, monkeypatch, capsys):
    commands = launch_commands(recipe)
    assert commands, f"{recipe.relative_to(REPO)} opens with no `posttrain train` launch line"
    cwd = user_video_data(tmp_path) if recipe.parent.name == "tempsamp" else REPO
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for words in commands:
        argv, processes = validate_argv(words)
        assert (REPO / argv[1]).resolve() == recipe, f"the launch line names {argv[1]}, not this recipe"
        argv[1] = str(REPO / argv[1])
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"{' '.join(words)}\n{err}"


# ---------------------------------------------------------------------------------------- batch geometry


def test_geometry_suggestions_work_and_are_distinct():
    (msg,) = geometry_problems(TrainArgs(batch_size=128, micro_batch_size=128), 2)
    assert msg.startswith("batch_size 128 is not a multiple of micro_batch_size 128 × 2 processes = 256")
    assert "use micro_batch_size 64 (the same batch), or batch_size 256" in msg
    assert "256 or 256" not in msg
    (msg,) = geometry_problems(TrainArgs(batch_size=20, micro_batch_size=4), 2)
    assert msg.endswith("use micro_batch_size 2 or 5 (the same batch), or batch_size 16 or 24")
    (msg,) = geometry_problems(TrainArgs(batch_size=64, micro_batch_size=8), 3)  # no micro-batch divides 64 / 3
    assert msg.endswith("use batch_size 48 or 72")
    rl = geometry_problems(RLArgs(prompts_per_step=6, group_size=4, batch_size=12, micro_batch_size=4), 4)
    assert rl[0] == "prompts_per_step 6 is not a multiple of 4 processes; use prompts_per_step 4 or 8"
    assert rl[1].endswith("use micro_batch_size 3 (the same batch)")
    (msg,) = geometry_problems(RLArgs(prompts_per_step=16, group_size=8, batch_size=96, micro_batch_size=8), 2)
    assert msg == "prompts_per_step 16 × group_size 8 = 128 rows is not a multiple of batch_size 96; use batch_size 64 or 128"
    (msg,) = geometry_problems(RLArgs(prompts_per_step=16, group_size=8, micro_batch_size=128), 2)
    assert msg.startswith("batch_size 128 (the default: all rows) is not a multiple")


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("batch,micro", [(128, 128), (20, 4), (7, 3), (64, 8), (10, 4), (1, 2)])
def test_every_suggested_value_passes(batch, micro, processes):
    """Whatever the message proposes, applied alone, passes the check."""
    import re

    for msg in geometry_problems(TrainArgs(batch_size=batch, micro_batch_size=micro), processes):
        for key, values in re.findall(r"(micro_batch_size|batch_size) (\d+(?: or \d+)?)(?=\s|\(|,|$)",
                                      msg.split("; use ")[1]):
            numbers = [int(v) for v in values.split(" or ")]
            assert len(set(numbers)) == len(numbers), msg
            for value in numbers:
                fixed = TrainArgs(**{"batch_size": batch, "micro_batch_size": micro, key: value})
                assert geometry_problems(fixed, processes) == [], (msg, key, value)


# ------------------------------------------------------------------------------- module:function rewards


@pytest.fixture
def cwd_module(tmp_path, monkeypatch):
    """A package and a module in a fresh working directory that is not on sys.path (as under the `posttrain`
    console script, whose sys.path holds its bin directory, not the working directory)."""
    pkg = tmp_path / "ptcwd_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(
        "def my_reward(prompts, completions, completion_ids, answer, **kwargs):\n"
        "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    (tmp_path / "ptcwd_single.py").write_text(
        "def short(prompts, completions, completion_ids, **kwargs):\n"
        "    return [float(len(c) < 5) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)])
    yield tmp_path
    for name in ("ptcwd_pkg", "ptcwd_pkg.rewards", "ptcwd_single"):
        sys.modules.pop(name, None)


def test_module_reward_resolves_from_the_working_directory(cwd_module):
    from posttrain.reward.registry import resolve

    assert resolve("ptcwd_pkg.rewards:my_reward")([None], ["3"], None, answer=["3"]) == [1.0]
    assert resolve("ptcwd_single:short")([None], ["abc"], None) == [1.0]


def test_module_reward_from_the_working_directory_runs_in_worker_processes(cwd_module):
    from posttrain.reward import Scorer

    with Scorer([{"name": "ptcwd_pkg.rewards:my_reward"}], workers=1) as scorer:
        result = scorer.score(["1+2="], ["3"], None, {"answer": ["3"]})
    assert result.per_reward["my_reward"] == [1.0] and result.failures == {"my_reward": 0}


def test_missing_module_reward_names_the_working_directory(cwd_module):
    from posttrain.reward.registry import resolve

    with pytest.raises(UserError, match=r"cannot import `ptcwd_nope` \(from the current directory "):
        resolve("ptcwd_nope:fn")


# ----------------------------------------------------------------------------------------------- model paths


def test_missing_local_model_path_says_it_does_not_exist(tmp_path, monkeypatch):
    from posttrain.models import load_tokenizer, model_config

    monkeypatch.chdir(tmp_path)
    for path in ("./nope", "../nope-posttrain", str(tmp_path / "nope")):
        with pytest.raises(UserError, match=f"^`{path}` does not exist"):
            load_tokenizer(path)
        with pytest.raises(UserError, match=f"^`{path}` does not exist"):
            model_config(path)


def test_directory_that_is_not_a_model_says_so(tmp_path, monkeypatch):
    from posttrain.models import load_causal_lm, load_tokenizer, model_config
    from posttrain.recipe.schema import ModelSpec

    (tmp_path / "notes").mkdir()
    monkeypatch.chdir(tmp_path)
    want = ("`notes` is a directory but holds no config.json (not a Hugging Face model directory; "
            "a run directory? use RUN/<stage>/final)")
    for load in (load_tokenizer, model_config, lambda p: load_causal_lm(p, ModelSpec(path=p))):
        with pytest.raises(UserError) as info:
            load("notes")  # no ./ prefix: an existing directory is local too
        assert str(info.value) == want


def test_run_directory_as_a_model_names_its_checkpoints(tmp_path):
    from posttrain.models import load_tokenizer

    final = tmp_path / "run" / "sft" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    with pytest.raises(UserError, match=f"holds no config.json .*use `{final}`"):
        load_tokenizer(tmp_path / "run")


def test_hub_ids_are_left_to_the_hub():
    from posttrain.models import check_model_dir

    check_model_dir("Qwen/Qwen2.5-0.5B")
    check_model_dir("gpt2")


def test_eval_of_a_bad_local_path_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    (tmp_path / "empty").mkdir()
    assert main(["eval", "./no-such-model", "--bench", "quickstart", "--limit", "1"]) == 2
    assert "`./no-such-model` does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "empty"), "--bench", "quickstart", "--limit", "1"]) == 2
    assert f"`{tmp_path / 'empty'}` is a directory but holds no config.json" in capsys.readouterr().err


def test_train_from_a_directory_that_is_not_a_model_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n' * 8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nmodel:\n  path: ./ckpts\ntracking: {progress: false}\nstages:\n  sft:\n"
        "    data: {path: data.jsonl, template: plain}\n    args: {batch_size: 4, micro_batch_size: 4, steps: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    assert "ckpts` is a directory but holds no config.json" in capsys.readouterr().err
