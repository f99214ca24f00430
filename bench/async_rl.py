"""Benchmark (not a test): GRPO steps with rollouts on a vLLM server in its own process, synchronous (k = 0)
and asynchronous (k = 1), on the same model, data and seed.

Builds a random-init model (head dim 32 or 64 so vLLM's CPU kernels run it), writes the quickstart-style
arithmetic data, and runs `posttrain train` once per k with `engine: vllm_server` (posttrain starts the server
on this machine: on a GPU machine it shares the one GPU with the learner, `--gpu-memory-utilization` of it,
and weights travel over NCCL; on CPU over posttrain_gloo). Prints, per k, the medians over the steps after
the first two of: step time, the learner's wait for its batch, generation time (on the rollout thread for
k = 1), update and sync seconds, generated tokens/s, and the overlap: the share of generation time hidden
behind training (1 − wait / generate).

    OMP_NUM_THREADS=1 python bench/async_rl.py [--size 25M --steps 12 --prompts 16 --n 8 --max-tokens 64]

Figures depend on the machine; the README quotes ours. On a 2-core CPU the trainer and the server share two
cores, so overlap is bounded by the cores, not by the scheme.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
         "25M": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536),
         "0.5B": dict(hidden=1024, layers=24, heads=16, kv_heads=8, intermediate=2816)}


def recipe(data: Path, size: dict, args: argparse.Namespace, k: int) -> dict:
    return {
        "name": f"bench-async-{k}", "seed": 0,
        "precision": "bf16" if args.gpu else "fp32",
        "model": {"new": {"arch": "qwen3", "max_position": 512, "vocab_size": 300,
                          "tokenizer_corpus": [str(REPO / "data/quickstart/corpus.txt")], **size}},
        "tracking": {"progress": False},
        "stages": {"grpo": {
            "data": {"path": str(data), "template": "plain", "max_length": 16},
            "rewards": [{"name": "exact"}],
            "engine": "vllm_server",
            "vllm_server": {"gpu_memory_utilization": args.gpu_memory_utilization},
            "args": {"steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.n,
                     "micro_batch_size": args.micro_batch_size, "max_tokens": args.max_tokens, "lr": 1e-5,
                     "temperature": 1.0, "tis_cap": 2.0, "async_steps": k},
        }},
    }


def run(k: int, data: Path, size: dict, args, work: Path) -> list[dict]:
    path = work / f"k{k}.yaml"
    path.write_text(yaml.safe_dump(recipe(data, size, args, k)))
    run_dir = work / f"run-k{k}"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path), "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"k={k} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "grpo" and "time/step" in r]


def summary(rows: list[dict], skip: int = 2) -> dict:
    rows = rows[skip:] or rows

    def med(key):
        return statistics.median(r.get(key, 0.0) for r in rows)

    out = {key.split("/")[-1]: med(key) for key in
           ("time/step", "time/wait_rollout", "time/generate", "time/update", "time/sync", "engine/staleness")}
    out["tokens_per_step"] = med("completion_len/mean")  # per row
    out["overlap"] = max(0.0, 1 - out["wait_rollout"] / max(out["generate"], 1e-9))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="25M")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()
    import torch

    args.gpu = torch.cuda.is_available()
    sys.path.insert(0, str(REPO))
    from tests.helpers import write_addition_data

    with tempfile.TemporaryDirectory(prefix="posttrain-bench-async-") as tmp:
        work = Path(tmp)
        data = write_addition_data(work / "data", n_train=2000) / "train.jsonl"
        results = {k: summary(run(k, data, SIZES[args.size], args, work)) for k in (0, 1)}
    rows_per_step = args.prompts * args.n
    print(f"GRPO, {args.size} model, {args.prompts} prompts × {args.n} samples, up to {args.max_tokens} tokens, "
          f"{'GPU (nccl)' if args.gpu else 'CPU (posttrain_gloo)'}; medians of steps 3..{args.steps}")
    print(f"{'k':>2} {'step s':>8} {'wait s':>8} {'gen s':>8} {'update s':>9} {'sync s':>8} {'tok/s':>8} "
          f"{'overlap':>8} {'stale':>6}")
    for k, r in results.items():
        tokens = r["tokens_per_step"] * rows_per_step
        print(f"{k:>2} {r['step']:8.3f} {r['wait_rollout']:8.3f} {r['generate']:8.3f} {r['update']:9.3f} "
              f"{r['sync']:8.3f} {tokens / r['step']:8.0f} {r['overlap']:8.2f} {r['staleness']:6.1f}")
    print(f"step time k=0 / k=1: {results[0]['step'] / results[1]['step']:.2f}")


if __name__ == "__main__":
    main()
