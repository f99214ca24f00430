"""The fault contract (README "Reliability"): every fault a user can cause ends in a clear error (exit 2, naming
the file, row, key or path), a count in the metrics, or a recovery. One or more cases per class; the behaviours
that already worked are here too, so they keep working. Eval-prediction faults: tests/test_faults_eval.py;
launch lines, model paths and `module:function` rewards: tests/test_faults_usage.py."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from helpers import recipe_dict, write_addition_data, write_recipe
from posttrain.cli import main


def _run(recipe_path: Path, *args: str) -> int:
    return main(["train", str(recipe_path), *args])


def _steps(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["stage"], r["step"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


# ------------------------------------------------------------------------------------------- lost work


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step SFT run with checkpoints at steps 2 and 4 (and its final weights as the reference)."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_addition_data(root / "data")
    recipe = write_recipe(root, recipe_dict(data, steps=6, save_every=2, keep_last=3))
    assert _run(recipe, "--run-dir", str(root / "run")) == 0
    return recipe, root / "run"


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_a_truncated_newest_checkpoint_is_skipped_and_resume_falls_back_to_the_one_before(finished_run, tmp_path,
                                                                                        capsys):
    recipe, reference = finished_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "sft" / "final")  # the crash came before the stage ended ...
    weights = run / "sft" / "checkpoint-4" / "learner" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # ... and left the newest checkpoint truncated
    with pytest.warns(UserWarning, match=r"checkpoint .*checkpoint-4 is damaged \(learner/model.safetensors has "
                                         r"100 bytes"):
        assert _run(recipe, "--resume", str(run)) == 0
    assert "resuming stage `sft` from" in capsys.readouterr().out
    assert _steps(run) == [("sft", s) for s in range(1, 7)]  # rewound to step 2, steps 3-6 logged once again
    a, b = _weights(reference / "sft" / "final"), _weights(run / "sft" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as the uninterrupted run


def test_a_checkpoint_that_cannot_be_loaded_exits_2_naming_it(finished_run, tmp_path, capsys):
    recipe, reference = finished_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "sft" / "final")
    optimizer = run / "sft" / "checkpoint-4" / "learner" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # damaged, same size: only loading shows it
    assert _run(recipe, "--resume", str(run)) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "checkpoint-4 cannot be loaded" in err and "delete it" in err
    assert "Traceback" not in err


def test_metrics_survive_a_kill_while_resume_rewrites_them(finished_run, tmp_path, monkeypatch):
    """`--resume` rewinds metrics.jsonl by writing a new file and renaming it: a kill in the middle of the write
    leaves the old file whole (before, the file was rewritten in place and a kill left it empty)."""
    import os

    from posttrain import checkpoint

    _, reference = finished_run
    path = tmp_path / "metrics.jsonl"
    shutil.copy(reference / "metrics.jsonl", path)
    before = path.read_text()

    def killed(fd):
        raise KeyboardInterrupt  # stands in for SIGKILL between writing the new text and the rename

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic(path, "")
    assert path.read_text() == before


def test_a_line_cut_short_in_eval_jsonl_is_evaluated_again_not_a_traceback(tmp_path):
    from posttrain.evaluation.training import TrainingEval

    (tmp_path / "eval.jsonl").write_text('{"model": "initial", "step": 0}\n{"model": "sft", "st')
    fake = TrainingEval.__new__(TrainingEval)
    fake.run_dir = tmp_path
    assert set(fake.done()) == {"initial"}


# ------------------------------------------------------------------------------------------------ IO


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    data = write_addition_data(root / "data", n_train=40, n_test=5)
    return write_recipe(root, recipe_dict(data, steps=2)), data


def test_a_run_dir_under_a_file_exits_2_before_training(tiny_recipe, tmp_path, capsys):
    recipe, _ = tiny_recipe
    (tmp_path / "afile").write_text("x")
    assert _run(recipe, "--run-dir", str(tmp_path / "afile" / "run")) == 2
    err = capsys.readouterr().err
    assert f"run directory `{tmp_path / 'afile' / 'run'}`: `{tmp_path / 'afile'}` is a file, not a directory" in err


def test_an_unwritable_run_dir_exits_2_naming_path_and_cause(tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe, _ = tiny_recipe
    original = Path.write_text

    def denied(self, *a, **k):  # tests run as root, where chmod does not stop writes: refuse like EACCES would
        if self.name == ".posttrain-write-test":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", denied)
    assert _run(recipe, "--run-dir", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"run directory `{tmp_path / 'run'}` cannot be written: Permission denied" in err


def test_a_full_disk_before_training_and_during_it_exits_2(tiny_recipe, tmp_path, capsys, monkeypatch):
    import errno
    import shutil as sh

    from posttrain import checkpoint

    recipe, _ = tiny_recipe
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    assert _run(recipe, "--run-dir", str(tmp_path / "a")) == 2
    assert "only 10 MiB free on its disk" in capsys.readouterr().err
    monkeypatch.undo()

    def full(path, state):  # the disk fills while the final checkpoint is written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_json", full)
    assert _run(recipe, "--run-dir", str(tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert "cannot write `" in err and "state.json`: no space left on the device" in err and "--resume" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["../outside", "a/b", "eval", ".hidden"])
def test_a_stage_name_that_is_not_a_plain_directory_name_is_refused(tiny_recipe, tmp_path, name):
    from posttrain.errors import UserError
    from posttrain.recipe import load_recipe

    _, data = tiny_recipe
    r = recipe_dict(data)
    r["stages"] = {name: {**r["stages"]["sft"], "kind": "sft"}}
    with pytest.raises(UserError, match=rf"stages\.{name}: a stage name becomes a directory of the run"):
        load_recipe(write_recipe(tmp_path, r))


# ------------------------------------------------------------------------------------------ bad data


def _data_with(tmp_path: Path, extra_lines: list[bytes]) -> Path:
    data = write_addition_data(tmp_path / "data", n_train=40, n_test=5)
    with open(data / "train.jsonl", "ab") as f:
        for line in extra_lines:
            f.write(line + b"\n")
    return data


BAD_LINES = {
    "null completion": (b'{"prompt": "1+1=", "completion": null}', "row 41: `completion` is missing or null"),
    "missing prompt": (b'{"completion": "2"}', "row 41: `prompt` is missing or null"),
    "not UTF-8": (b'{"prompt": "1+1=", "completion": "\xff\xfe"}', ":41: not UTF-8 text (byte 0xff at column 35)"),
    "not JSON": (b'{"prompt": "1+1=", "completion": ', ":41: not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_training_row_exits_2_at_validate_and_at_train_naming_file_and_row(tmp_path, capsys, case):
    line, expected = BAD_LINES[case]
    data = _data_with(tmp_path, [line])
    recipe = write_recipe(tmp_path, recipe_dict(data, steps=2))
    assert main(["validate", str(recipe)]) == 2  # found in seconds, before a model loads
    err = capsys.readouterr().err
    assert expected in err and str(data / "train.jsonl") in err and "bad_rows: skip" in err
    assert _run(recipe, "--run-dir", str(tmp_path / "run")) == 2
    assert expected in capsys.readouterr().err


def test_bad_rows_skip_leaves_them_out_counts_and_warns(tmp_path):
    data = _data_with(tmp_path, [BAD_LINES["not UTF-8"][0], BAD_LINES["null completion"][0]])
    r = recipe_dict(data, steps=2)
    r["stages"]["sft"]["data"]["bad_rows"] = "skip"
    recipe = write_recipe(tmp_path, r)
    assert main(["validate", str(recipe)]) == 0
    with pytest.warns(UserWarning, match=r"skipped 1 bad line\(s\)") as record:
        assert _run(recipe, "--run-dir", str(tmp_path / "run")) == 0
    assert any("skipped 1 bad row(s)" in str(w.message) for w in record)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["data/skipped_rows"] == 2


def test_a_validation_size_larger_than_the_data_exits_2(tmp_path, capsys):
    data = write_addition_data(tmp_path / "data", n_train=40, n_test=5)
    r = recipe_dict(data, steps=2)
    r["stages"]["sft"]["data"]["validation_size"] = 500
    recipe = write_recipe(tmp_path, r)
    assert main(["validate", str(recipe)]) == 2
    assert "validation_size: 500 rows held out of the 40 rows" in capsys.readouterr().err
    r["stages"]["sft"]["data"]["validation_size"] = 1.5
    assert _run(write_recipe(tmp_path, r), "--run-dir", str(tmp_path / "run")) == 2
    assert "validation_size: 1.5 is a fraction of the rows and must be below 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ silent RL drops


def _grpo(data: Path, **data_args) -> dict:
    r = recipe_dict(data, steps=1)
    r["stages"]["grpo"] = {
        "data": {"path": f"{data}/rl.jsonl", "template": "plain", "max_length": 8, **data_args},
        "rewards": [{"name": "exact"}],
        "args": {"steps": 1, "prompts_per_step": 4, "group_size": 2, "batch_size": 8, "micro_batch_size": 8,
                 "max_tokens": 3, "lr": 1e-3},
    }
    return r


def test_rl_rows_without_a_reference_and_prompts_too_long_are_counted_warned_and_logged(tmp_path):
    data = write_addition_data(tmp_path / "data", n_train=40, n_test=5)
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()][:12]
    rows[0]["answer"] = None
    rows[1]["answer"] = "  "
    rows[2]["prompt"] = "1+" * 30 + "1="  # far over max_length 8
    (data / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning) as record:
        assert _run(write_recipe(tmp_path, _grpo(data)), "--run-dir", str(tmp_path / "run")) == 0
    messages = [str(w.message) for w in record]
    assert any("2 of 12 rows are left out because no reward can score them (2 without `answer`" in m for m in messages)
    assert any("1 of 10 prompts are longer than max_length 8 tokens" in m for m in messages)
    counts = next(json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if '"grpo"' in l)
    assert counts["step"] == 0 and counts["data/unscorable_rows"] == 2 and counts["data/prompts_too_long"] == 1


def test_an_rl_stage_with_nothing_to_score_refuses_to_start(tmp_path, capsys):
    data = write_addition_data(tmp_path / "data", n_train=40, n_test=5)
    rows = [{"prompt": json.loads(l)["prompt"]} for l in (data / "train.jsonl").read_text().splitlines()][:8]
    (data / "rl.jsonl").write_text("".join(json.dumps({**r, "answer": None}) + "\n" for r in rows))
    assert _run(write_recipe(tmp_path, _grpo(data)), "--run-dir", str(tmp_path / "run")) == 2
    assert "no row can be scored: every reward abstains on every row (`exact` reads `answer`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ verifiers


def test_a_verifier_module_that_hangs_at_import_is_an_error_not_a_hang(tiny_recipe, tmp_path, capsys, monkeypatch):
    import time

    from posttrain.reward import registry

    _, data = tiny_recipe
    (tmp_path / "slow_reward.py").write_text("import time\ntime.sleep(30)\n"
                                             "def reward(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.setattr(registry, "IMPORT_TIMEOUT_S", 1.0)
    r = _grpo(data)
    r["stages"]["grpo"]["data"]["path"] = f"{data}/train.jsonl"
    r["stages"]["grpo"]["rewards"] = [{"name": f"{tmp_path}/slow_reward.py:reward"}]
    began = time.perf_counter()
    assert main(["validate", str(write_recipe(tmp_path, r))]) == 2
    assert time.perf_counter() - began < 15
    assert "did not finish importing within 1 s" in capsys.readouterr().err


def test_a_verifier_failing_on_every_row_stops_the_stage_and_counts_under_one_name(tiny_recipe, tmp_path, capsys):
    _, data = tiny_recipe
    (tmp_path / "broken_reward.py").write_text("def reward(completions, **kw):\n    raise ValueError('no network')\n")
    r = _grpo(data)
    r["stages"]["grpo"]["data"]["path"] = f"{data}/train.jsonl"
    r["stages"]["grpo"]["args"]["steps"] = 6
    r["stages"]["grpo"]["rewards"] = [{"name": "exact"}, {"name": f"{tmp_path}/broken_reward.py:reward",
                                                         "failure_patience": 2}]
    r["stages"]["grpo"]["scorer"] = {"workers": 1}
    with pytest.warns(UserWarning, match=r"further errors of this reward are only counted \(verifier/reward/failures\)"):
        assert _run(write_recipe(tmp_path, r), "--run-dir", str(tmp_path / "run")) == 2
    captured = capsys.readouterr()
    assert ("reward `reward` failed or timed out on 8 of 8 rows, more than max_failure_share 0.5, in 2 scoring "
            "batches in a row (last: ValueError: no network)") in captured.err
    # the per-reward summary is printed when the stage ends, however it ends
    assert "reward `exact`: 16 calls, 0 failures, 0 timeouts" in captured.out
    assert "reward `reward`: 16 calls, 16 failures, 0 timeouts" in captured.out
    grpo = next(json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"grpo"' in l)
    assert grpo["step"] == 1 and grpo["verifier/reward/failures"] == 8  # one name: verifier/<key>/failures


def test_the_scorer_settings_come_from_the_recipe(tiny_recipe, tmp_path):
    from posttrain.recipe import load_recipe
    from posttrain.stages import rl

    _, data = tiny_recipe
    r = _grpo(data)
    r["stages"]["grpo"]["scorer"] = {"workers": 0, "memory_mb": 512}
    (stage,) = [s for s in load_recipe(write_recipe(tmp_path, r)).stages if s.name == "grpo"]

    class Ctx:
        pass

    ctx = Ctx()
    ctx.stage = stage
    scorer = rl.stage_scorer(ctx)
    assert scorer.workers == 0 and scorer.memory_mb == 512


def test_a_distill_stage_counts_bad_and_too_long_rows_and_stops_on_a_null_privileged_column(tmp_path, capsys):
    data = write_addition_data(tmp_path / "d", n_train=40, n_test=5)
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()][:12]
    hinted = [{**row, "hint": row["answer"]} for row in rows]
    hinted[0]["hint"] = None
    hinted[1]["prompt"] = "1+" * 30 + "1="
    (data / "hinted.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hinted))
    r = recipe_dict(data, steps=1)
    r["stages"]["distill"] = {
        "data": {"path": f"{data}/hinted.jsonl", "template": "plain", "max_length": 16},
        "privileged": {"column": "hint", "template": "{privileged}|{prompt}"},
        "rewards": [{"name": "exact"}],
        "args": {"steps": 1, "prompts_per_step": 4, "group_size": 2, "batch_size": 8, "micro_batch_size": 8,
                 "max_tokens": 3, "lr": 1e-3},
    }
    assert _run(write_recipe(tmp_path, r), "--run-dir", str(tmp_path / "a")) == 2
    assert "row 1: `hint` is missing or null" in capsys.readouterr().err
    r["stages"]["distill"]["data"]["bad_rows"] = "skip"
    with pytest.warns(UserWarning, match="1 of 11 rows have a teacher or student prompt longer than max_length 16"):
        assert _run(write_recipe(tmp_path, r), "--run-dir", str(tmp_path / "b")) == 0
    counts = next(json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
                  if '"distill"' in l)
    assert counts["step"] == 0 and counts["data/skipped_rows"] == 1 and counts["data/prompts_too_long"] == 1
