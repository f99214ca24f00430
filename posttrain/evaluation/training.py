"""A recipe's `eval:` block during a run: the same Evaluator as `posttrain eval`, on the main process.

* before the first stage (`initial: true`) and after each stage, on the saved HF checkpoint (what a user
  loads), one row per model in `eval.jsonl` (`accuracy` = the first benchmark's pass@1, `n` its problems,
  `metrics` everything) and the samples in `eval/<label>.jsonl`;
* with `every: N`, also every N optimizer steps inside each stage, on the learner's live weights;
* every result also goes to metrics.jsonl as `eval/<bench>/<metric>` at its stage and step (so
  `posttrain plot` draws it and the trackers receive it).

The other processes wait at a barrier meanwhile. In-stage evaluation generates with the main process's
unwrapped module, so it needs the full weights there: it is refused under DeepSpeed ZeRO-3 (stage-end
evaluation, which loads the saved checkpoint, works everywhere).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluation.report import dumps

EVAL_FILE = "eval.jsonl"


class TrainingEval:
    def __init__(self, resolved, run_dir: Path, accelerator, log):
        from posttrain.recipe.benchmark import recipe_benchmarks

        self.spec = resolved.recipe.eval
        self.run_dir, self.acc, self.log = Path(run_dir), accelerator, log
        self.every = self.spec.every
        specs, data = recipe_benchmarks(self.spec, resolved.source)
        if self.every and _zero3(accelerator):
            raise UserError(f"{resolved.locate('eval', 'every')}: eval.every: in-stage evaluation needs the full "
                            f"weights on the main process, which DeepSpeed ZeRO-3 shards; set eval.every: 0 "
                            f"(stage-end evaluation still runs) or use ZeRO-2")
        self.evaluator = None
        if accelerator.is_main_process:
            from posttrain.evaluation.runner import Evaluator

            self.evaluator = Evaluator(specs, data, progress=resolved.recipe.tracking.progress)
        self.first = specs[0].name

    def done(self) -> dict[str, dict]:
        """Rows of eval.jsonl already written (a resumed run does not evaluate those models again)."""
        path = self.run_dir / EVAL_FILE
        if not path.is_file():
            return {}
        rows = {}
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that model is evaluated again
            if row:
                rows[row["model"]] = row
        return rows

    def checkpoint(self, model_dir, label: str, stage: str, step: int) -> dict | None:
        """Evaluate a saved checkpoint; append its row to eval.jsonl."""
        row = None
        if self.evaluator is not None:
            from posttrain.evaluation.cli import make_eval_engine

            engine, tokenizer = make_eval_engine("hf", str(model_dir), "fp32", self.spec.batch_size)
            results = self.evaluator.run(engine, tokenizer, desc=f"eval {label}")
            row = self._record(results, label, stage, step)
            with open(self.run_dir / EVAL_FILE, "a") as f:
                f.write(dumps(row) + "\n")  # strict JSON: a NaN metric is null
            shown = ", ".join(f"{name} {_headline(r.metrics)}" for name, r in results.items())
            print(f"[posttrain] eval {label}: {shown}")
        self.acc.wait_for_everyone()
        return row

    def maybe_in_stage(self, learner, tokenizer, stage: str, step: int, total: int) -> None:
        """Every `every` steps (not the last: the stage-end evaluation covers it), on the live weights."""
        if not self.every or step % self.every or step >= total:
            return
        if self.evaluator is not None:
            from posttrain.rollout.base import make_engine

            engine = make_engine("hf", model=learner.unwrapped(), tokenizer=tokenizer, batch_size=self.spec.batch_size)
            self._record(self.evaluator.run(engine, tokenizer, desc=f"eval {stage}@{step}"), f"{stage}-step{step}",
                         stage, step)
        self.acc.wait_for_everyone()

    def _record(self, results: dict, label: str, stage: str, step: int) -> dict:
        (self.run_dir / "eval").mkdir(exist_ok=True)
        with open(self.run_dir / "eval" / f"{label}.jsonl", "w") as f:
            for r in results.values():
                for sample in r.samples:
                    f.write(dumps(sample) + "\n")
        flat = {f"eval/{name}/{metric}": value for name, r in results.items() for metric, value in r.metrics.items()}
        self.log.log_extra(stage, step, flat)
        first = results[self.first]
        headline = first.metrics.get("pass@1", first.metrics.get("mIoU"))  # math: pass@1, grounding: mIoU
        return {"model": label, "stage": stage, "step": step, "accuracy": headline,
                "n": first.info["problems"], "metrics": {name: r.metrics for name, r in results.items()}}

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def _headline(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in list(metrics.items())[:3])


def _zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3
