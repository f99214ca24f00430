"""Benchmark (not a test): GRPO vs NFT vs SPO from the same SFT checkpoint on the quickstart task.

Trains the quickstart SFT stage once (or reuses `--sft DIR`), then runs the RL stage of each quickstart recipe
(`recipes/quickstart/{pipeline,nft,spo}.yaml`) from that checkpoint for the same number of steps and rollouts
(16 prompts × 8 samples per step), saving a checkpoint every `--eval-every` steps, and evaluates every
checkpoint's held-out greedy accuracy. Prints a learning-curve table and writes `compare_rl.png`.

    OMP_NUM_THREADS=1 python bench/compare_rl.py --out runs/bench-rl [--steps 500 --eval-every 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runs import train  # bench/runs.py (this directory is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"grpo": "recipes/quickstart/pipeline.yaml", "nft": "recipes/quickstart/nft.yaml",
           "spo": "recipes/quickstart/spo.yaml"}


def _resolved(recipe: str) -> dict:
    import posttrain.stages  # noqa: F401  (registers the stage kinds)
    from posttrain.recipe import load_recipe

    return load_recipe(REPO / recipe).raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-rl")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--sft", default=None, help="reuse this SFT checkpoint instead of training one")
    ns = parser.parse_args()
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    base = _resolved(RECIPES["grpo"])
    if ns.sft:
        sft = Path(ns.sft).resolve()
    else:
        recipe = {**base, "eval": None, "tracking": {"progress": False},
                  "stages": {"sft": base["stages"]["sft"]}}
        sft = train(recipe, out, "sft") / "sft" / "final"

    from posttrain.evaluation.cli import make_eval_engine
    from posttrain.evaluation.runner import Evaluator
    from posttrain.recipe.benchmark import load_spec

    evaluator = Evaluator([load_spec("quickstart")], progress=False)

    def accuracy(checkpoint: Path) -> float:
        engine, tokenizer = make_eval_engine("hf", str(checkpoint), "fp32", 64)
        return evaluator.run(engine, tokenizer)["quickstart"].metrics["pass@1"]

    start = accuracy(sft)
    curves = {}
    for algo, path in RECIPES.items():
        raw = _resolved(path)
        stage = raw["stages"][algo]
        stage["args"].update(steps=ns.steps, save_every=ns.eval_every, keep_last=ns.steps // ns.eval_every)
        recipe = {**raw, "model": {"path": str(sft)}, "eval": None, "tracking": {"progress": False},
                  "stages": {algo: stage}}
        run = train(recipe, out, algo)
        curve = [(0, start)]
        for step in range(ns.eval_every, ns.steps + 1, ns.eval_every):
            ckpt = run / algo / (f"checkpoint-{step}" if step < ns.steps else "final")
            curve.append((step, accuracy(ckpt)))
        curves[algo] = curve

    evaluator.close()
    print("\nheld-out greedy exact match (500 prompts) after N RL steps of 16 prompts × 8 samples")
    print("step  " + "".join(f"{n:>8}" for n in curves))
    for i, (step, _) in enumerate(curves["grpo"]):
        print(f"{step:>4}  " + "".join(f"{curves[n][i][1]:>8.3f}" for n in curves))
    _plot(curves, out / "compare_rl.png")
    (out / "compare_rl.json").write_text(json.dumps(curves))
    print(f"\nwrote {out / 'compare_rl.png'}")
    return 0


def _plot(curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", label=name)
    ax.set_xlabel("RL step (16 prompts × 8 samples)")
    ax.set_ylabel("held-out greedy exact match")
    ax.set_title("quickstart: GRPO vs NFT vs SPO from one SFT checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
