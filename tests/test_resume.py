"""A run killed with SIGKILL after a checkpoint and resumed ends with the same weights as an uninterrupted
run, mid-recipe included (the kill lands in the second stage)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import recipe_dict, write_addition_data, write_recipe

pytestmark = pytest.mark.slow

# Runs the CLI in a child process that SIGKILLs itself right after optimizer step `KILL_AT` of stage
# `KILL_STAGE` — after a checkpoint was written and before the next one: work past the checkpoint is lost.
KILLER = """
import os, signal, sys
import posttrain.learner as L
stage, at = os.environ["KILL_STAGE"], int(os.environ["KILL_AT"])
original = L.Learner.train_step
def train_step(self, *a, **k):
    out = original(self, *a, **k)
    if self.step == at and os.environ.get("POSTTRAIN_STAGE_UNDER_TEST") == stage:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
L.Learner.train_step = train_step
import posttrain.stages.context as C
run_loop = C.run_loop
def marked(ctx, *a, **k):
    os.environ["POSTTRAIN_STAGE_UNDER_TEST"] = ctx.stage.name
    return run_loop(ctx, *a, **k)
C.run_loop = marked
from posttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _recipe(root: Path) -> Path:
    data = write_addition_data(root / "data")
    r = recipe_dict(data, steps=4)
    r["stages"]["polish"] = {
        "kind": "sft",
        "data": r["stages"]["sft"]["data"],
        "args": {"lr": 1.0e-3, "batch_size": 8, "micro_batch_size": 4, "steps": 10, "save_every": 4,
                 "keep_last": 1, "weight_decay": 0.1},
    }
    return write_recipe(root, r)


def _train(recipe, *extra, killer=False, env=None):
    base = [sys.executable, "-c", KILLER] if killer else [sys.executable, "-m", "posttrain"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([*base, "train", str(recipe), *extra], env=env, cwd=recipe.parent, capture_output=True, text=True)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path)
    ref = _train(recipe, "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "killed"
    killed = _train(recipe, "--run-dir", str(run_dir), killer=True, env={"KILL_STAGE": "polish", "KILL_AT": "6"})
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "sft" / "final" / "state.json").is_file()  # stage 1 finished
    assert [p.name for p in (run_dir / "polish").glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (run_dir / "polish" / "final").exists()

    resumed = _train(recipe, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage `polish`" in resumed.stdout

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "polish" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run_dir / "polish" / "final").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("sft", s) for s in range(1, 5)] + [("polish", s) for s in range(1, 11)]


def test_keep_last_and_no_partial_checkpoints(tmp_path):
    recipe = _recipe(tmp_path)
    done = _train(recipe, "--run-dir", str(tmp_path / "run"), "stages.polish.args.save_every=2", "stages.polish.args.keep_last=2")
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "run" / "polish").iterdir())
    assert names == ["checkpoint-6", "checkpoint-8", "final"]
