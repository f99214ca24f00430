"""Benchmark (not a test): TempSamp-R1 vs plain GRPO from the same SFT checkpoint on the synthetic grounding task.

Trains the video quickstart's SFT stage once (or reuses `--sft DIR`), then runs its `tempsamp` stage twice from
that checkpoint with the same budget (steps × 16 prompts × 8 rows): as shipped (7 samples + the ground-truth row,
soft advantage) and as plain GRPO (`offpolicy: false, soft_advantage: false`: 8 samples, raw rewards). Saves a
checkpoint every `--eval-every` steps, evaluates each on the 200 held-out queries (greedy) and prints R1@0.5 and
mIoU curves; writes `compare_grounding.png` and `.json`.

    python -m posttrain.tasks.grounding --out data/grounding
    OMP_NUM_THREADS=1 python bench/compare_grounding.py --out runs/bench-grounding [--steps 200 --eval-every 50]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runs import train  # bench/runs.py (this directory is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart/video.yaml"
VARIANTS = {"tempsamp": {}, "grpo": {"offpolicy": False, "soft_advantage": False}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-grounding")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--sft", default=None, help="reuse this SFT checkpoint instead of training one")
    ns = parser.parse_args()
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import posttrain.stages  # noqa: F401  (registers the stage kinds)
    from posttrain.recipe import load_recipe

    raw = load_recipe(REPO / RECIPE).raw
    if ns.sft:
        sft = Path(ns.sft).resolve()
    else:
        recipe = {**raw, "eval": None, "tracking": {"progress": False}, "stages": {"sft": raw["stages"]["sft"]}}
        sft = train(recipe, out, "sft") / "sft" / "final"

    from posttrain.evaluation.cli import make_eval_engine
    from posttrain.evaluation.runner import Evaluator
    from posttrain.recipe.benchmark import load_spec

    evaluator = Evaluator([load_spec("grounding_quickstart")], progress=False)

    def measure(checkpoint: Path) -> dict:
        engine, tokenizer = make_eval_engine("hf", str(checkpoint), "fp32", 64)
        return evaluator.run(engine, tokenizer)["grounding_quickstart"].metrics

    start = measure(sft)
    curves = {}
    for name, change in VARIANTS.items():
        stage = json.loads(json.dumps(raw["stages"]["tempsamp"]))
        stage["args"].update(steps=ns.steps, save_every=ns.eval_every, keep_last=ns.steps // ns.eval_every, **change)
        recipe = {**raw, "model": {"path": str(sft)}, "eval": None, "tracking": {"progress": False},
                  "stages": {"tempsamp": stage}}
        run = train(recipe, out, name)
        curve = [(0, start)]
        for step in range(ns.eval_every, ns.steps + 1, ns.eval_every):
            ckpt = run / "tempsamp" / (f"checkpoint-{step}" if step < ns.steps else "final")
            curve.append((step, measure(ckpt)))
        curves[name] = curve
    evaluator.close()

    print("\nheld-out greedy grounding (200 queries) after N steps of 16 prompts × 8 rows")
    print("step  " + "".join(f"{n + ' R1@0.5':>16}{n + ' mIoU':>16}" for n in curves))
    for i, (step, _) in enumerate(curves["tempsamp"]):
        print(f"{step:>4}  " + "".join(f"{curves[n][i][1]['R1@0.5']:>16.3f}{curves[n][i][1]['mIoU']:>16.3f}"
                                       for n in curves))
    _plot(curves, out / "compare_grounding.png")
    (out / "compare_grounding.json").write_text(json.dumps(curves))
    print(f"\nwrote {out / 'compare_grounding.png'}")
    return 0


def _plot(curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    for ax, metric in zip(fig.subplots(1, 2), ("R1@0.5", "mIoU")):
        for name, curve in curves.items():
            ax.plot([s for s, _ in curve], [m[metric] for _, m in curve], marker="o", label=name)
        ax.set_xlabel("RL step (16 prompts × 8 rows)")
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("synthetic grounding: TempSamp-R1 vs GRPO from one SFT checkpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
