"""Multi-process training on CPU (gloo): DDP and DeepSpeed ZeRO-2/3 give the loss curve of one process.

`accelerate launch --cpu --num_processes 2` silently runs ONE process; `--multi_gpu` (or a config file)
plus `Accelerator(cpu=True)` on a CUDA-less machine forms a real 2-process gloo group.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import recipe_dict, ttcs_recipe, write_addition_data, write_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "posttrain-torch-extensions"))
    return env


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = write_addition_data(root / "data")
    # micro 2: one process accumulates 4 micro-batches, two processes 2 each → same global batch of 8
    recipe = write_recipe(root, recipe_dict(data, steps=6, micro_batch_size=2, save_every=3))
    single = root / "single"
    subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe), "--run-dir", str(single)],
                   check=True, env=_env(), cwd=root, capture_output=True)
    return root, recipe, single


def _launch(root, recipe, run_dir, *launch_args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_processes", "2",
           "-m", "posttrain", "train", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=_env(), cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("launch", [
    ["--multi_gpu"],
    ["--config_file", str(REPO / "recipes/accelerate/ddp.yaml")],
    ["--config_file", str(REPO / "recipes/accelerate/zero2.yaml")],
    ["--config_file", str(REPO / "recipes/accelerate/zero3.yaml")],
], ids=["multi_gpu-flag", "ddp", "zero2", "zero3"])
def test_two_processes_match_one_process_with_twice_the_accumulation(setup, launch):
    import torch
    from transformers import AutoModelForCausalLM

    root, recipe, single = setup
    run_dir = root / f"two-{launch[-1].split('/')[-1]}"
    _launch(root, recipe, run_dir, *launch)
    assert _losses(run_dir) == pytest.approx(_losses(single), rel=1e-5)
    assert (run_dir / "sft" / "checkpoint-3" / "learner").is_dir()
    a = AutoModelForCausalLM.from_pretrained(single / "sft" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_step_two_processes_equal_one(tiny_lm_dir, aggregation):
    script = str(REPO / "tests" / "scripts" / "grpo_step.py")

    def last_json(stdout):
        return json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])

    one = subprocess.run([sys.executable, script, str(tiny_lm_dir), aggregation], env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          script, str(tiny_lm_dir), aggregation], env=_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = last_json(one.stdout), last_json(two.stdout)
    assert (a["processes"], b["processes"]) == (1, 2)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-8)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["checksum"] == pytest.approx(a["checksum"], rel=1e-6)


def test_ttcs_and_distill_stages_run_on_two_processes(tmp_path):
    """Each process samples its shard of the questions; both TTCS policies (two DDP models on one Accelerator)
    and the distillation stage's two-prompt forwards train and checkpoint under a 2-process gloo group."""
    data = write_addition_data(tmp_path / "data")
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    (data / "hinted.jsonl").write_text("".join(json.dumps({**r, "hint": r["answer"]}) + "\n" for r in rows))
    r = ttcs_recipe(data, data / "test.jsonl", steps=2)
    r["stages"]["distill"] = {
        "data": {"path": f"{data}/hinted.jsonl", "template": "plain", "max_length": 16},
        "privileged": {"column": "hint", "template": "{privileged}|{prompt}"}, "rewards": [{"name": "exact"}],
        "args": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "batch_size": 8, "micro_batch_size": 2,
                 "max_tokens": 5, "lr": 1e-3},
    }
    r["stages"]["ttcs"]["args"]["micro_batch_size"] = 2
    r["stages"]["ttcs"]["synthesizer"]["args"]["micro_batch_size"] = 2
    recipe = write_recipe(tmp_path, r)
    run_dir = tmp_path / "run"
    _launch(tmp_path, recipe, run_dir, "--multi_gpu")
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if x["stage"] == "ttcs"] == [1, 2]
    assert [x["step"] for x in records if x["stage"] == "distill"] == [1, 2]
    for part in ("ttcs/final", "ttcs/final/synthesizer", "distill/final"):
        assert (run_dir / part / "model.safetensors").is_file(), part
