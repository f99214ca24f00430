"""Small builders shared by the tests: a toy dataset and a recipe that builds its own tiny model."""

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml


def write_addition_data(directory: Path, n_train: int = 400, n_test: int = 50, seed: int = 0) -> Path:
    rng = random.Random(seed)
    pairs = sorted({(rng.randrange(50), rng.randrange(50)) for _ in range(3 * (n_train + n_test))})
    rng.shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)} for a, b in pairs]
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("test", rows[n_train : n_train + n_test])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (directory / "corpus.txt").write_text("".join(r["prompt"] + r["completion"] + "\n" for r in rows[:n_train]))
    return directory


def recipe_dict(data: Path, *, steps: int = 4, name: str = "t", **args) -> dict:
    return {
        "name": name,
        "seed": 0,
        "model": {"new": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "max_position": 64,
                          "vocab_size": 300, "tokenizer_corpus": [f"{data}/corpus.txt"]}},
        "tracking": {"progress": False},
        "stages": {"sft": {
            "data": {"path": f"{data}/train.jsonl", "template": "plain", "max_length": 32},
            "args": {"lr": 3.0e-3, "batch_size": 8, "micro_batch_size": 4, "steps": steps, **args},
        }},
    }


def write_recipe(directory: Path, recipe: dict, name: str = "t.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def grpo_rows(n: int = 8, seed: int = 0) -> list[dict]:
    """Synthetic RL rows (prompt + completion ids, loss mask, advantage) of varied lengths."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(1, 64, (3 + i % 3,), generator=g).tolist()
        comp = torch.randint(1, 64, (2 + (5 * i) % 7,), generator=g).tolist()
        rows.append({"input_ids": prompt + comp, "mask": [0] * len(prompt) + [1] * len(comp),
                     "credit": {"adv": float(torch.randn((), generator=g))}, "truncated": False,
                     "rollout_logp": None})
    return rows


def variant_rows(data: Path) -> Path:
    """SFT rows teaching a tiny model both to answer `a+b=` and to write `<question>c+d=</question>`."""
    rng = random.Random(0)
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    out = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    out += [{"prompt": r["prompt"] + "?", "completion": f"<question>{rng.randrange(50)}+{rng.randrange(50)}=</question>"}
            for r in rows]
    rng.shuffle(out)
    (data / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return data / "mixed.jsonl"


def ttcs_recipe(data: Path, test_file: Path, steps: int = 2, **args) -> dict:
    r = recipe_dict(data, steps=200)
    r["stages"]["sft"]["data"]["path"] = str(variant_rows(data))
    r["stages"]["ttcs"] = {
        "data": {"path": str(test_file), "template": "plain", "max_length": 16},
        "synthesizer": {"template": "{question}?", "args": {
            "prompts_per_step": 4, "group_size": 2, "batch_size": 8, "micro_batch_size": 4, "max_tokens": 32,
            "lr": 1e-3}},
        "args": {"steps": steps, "prompts_per_step": 4, "synthetic_per_step": 2, "group_size": 4, "judge_samples": 4,
                 "batch_size": 8, "micro_batch_size": 4, "max_tokens": 4, "lr": 1e-3, "skeleton_check": False,
                 "diversity_tokens": "chars", "agreement_low": 0.0, "agreement_high": 1.0, **args},
    }
    return r


def tiny_overrides(data: Path, stage: str, quickstart: bool = False) -> list[str]:
    """Point a shipped recipe at a tiny model built here, local data and small batches, no eval (`quickstart`:
    also shrink its SFT warm start to 2 steps on the toy data)."""
    out = [
        "model.path=null", "model.attn_implementation=null", "model.gradient_checkpointing=false", "model.lora=null",
        f"model.new={{hidden: 32, layers: 2, heads: 4, kv_heads: 2, max_position: 64, vocab_size: 300, "
        f"tokenizer_corpus: [{data}/corpus.txt]}}",
        "precision=fp32", "tracking.trackers=[]", "tracking.progress=false", "eval=null",
        f"stages.{stage}.data.template=plain", f"stages.{stage}.data.system_prompt=null", f"stages.{stage}.data.rename={{}}",
        f"stages.{stage}.data.max_length=16", f"stages.{stage}.data.prompt_column=prompt",
    ]
    if quickstart:
        out += ["stages.sft.args.steps=2", f"stages.sft.data.path={data}/train.jsonl", "stages.sft.args.batch_size=8",
                "stages.sft.args.micro_batch_size=8", "stages.sft.data.max_length=32"]
    return out


def run_two_steps(recipe: Path, overrides: list[str], run_dir: Path, stage: str) -> Path:
    """Run a recipe with overrides in-process; the stage must log steps 1 and 2."""
    from posttrain import pipeline
    from posttrain.recipe import load_recipe

    pipeline.run(load_recipe(recipe, overrides), run_dir=run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == stage] == [1, 2]
    return run_dir


def user_video_data(root: Path) -> Path:
    """A working directory laid out as the TempSamp recipes tell users to (annotation files from ../shared/data
    stand in for the train splits, which are not among them)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("needs ../shared/data")
    layout = {"data/charades_sta/charades_sta_test.txt": "charades_sta/charades_sta_test.txt",
              "data/charades_sta/charades_sta_train.txt": "charades_sta/charades_sta_test.txt",
              "data/activitynet_captions/val_2.json": "activitynet_captions/val_2.json",
              "data/activitynet_captions/train.json": "activitynet_captions/val_1.json"}
    for target, source in layout.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared / source, root / target)
    return root


def check_stop_strings_and_truncation(engine, tokenizer, prompt: list[int]) -> None:
    """The rollout protocol on stop strings (kept in the text, the last token completes the first occurrence)
    and on truncated sampling (no log-probs: vLLM's would be renormalised over the top-p support)."""
    from posttrain.rollout.base import SamplingParams

    free = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1))[0]
    # an ASCII character some completion writes after its first one (byte-level tokens can decode to partial
    # UTF-8, so multi-byte text is no stable stop string)
    stop = next((ch for c in free for ch in c.text[1:] if ch.isascii() and ch.isalnum()), None)
    assert stop is not None
    stopped = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1, stop=(stop,)))[0]
    assert any(stop in c.text for c in stopped)
    for c in stopped:
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        if stop in c.text:
            assert c.finish_reason == "stop"
            assert stop not in tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
    top = engine.generate([prompt], SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=4))[0]
    assert all(c.logprobs is None for c in top)


def from_warm_start(warm: Path, run_dir: Path, stage: str = "sft") -> None:
    """A run directory holding only the warm run's first stage (`stage`), ready for `--resume`: the later
    stages then start from the very same checkpoint."""
    run_dir.mkdir(parents=True)
    for name in (stage, "init-model", "recipe.resolved.yaml"):
        (shutil.copytree if (warm / name).is_dir() else shutil.copy)(warm / name, run_dir / name)
    # the stage's metrics, not its evaluations: the resumed recipe measures its own benchmarks
    def evaluation(line: str) -> bool:
        return any(k.startswith("eval/") and k != "eval/loss" for k in json.loads(line))

    lines = (warm / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(l + "\n" for l in lines
                                                   if json.loads(l)["stage"] == stage and not evaluation(l)))


QUICKSTART_VLLM = ["model.new.hidden=128", "model.new.intermediate=384", "stages.sft.args.steps=750",
                   "stages.grpo.args.steps=250", "eval.every=125", "tracking.progress=false"]


def train_quickstart_vllm(run_dir: Path, *overrides: str, resume: bool = False) -> list[dict]:
    """README command 1 on the hidden-128 variant (4 heads of 32, which vLLM's CPU kernels run), 750 SFT and
    250 GRPO steps; returns the eval rows."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    where = ["--resume" if resume else "--run-dir", str(run_dir)]
    cmd = [sys.executable, "-m", "posttrain", "train", "recipes/quickstart/pipeline.yaml", *where, *QUICKSTART_VLLM,
           *overrides]
    proc = subprocess.run(cmd, cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
