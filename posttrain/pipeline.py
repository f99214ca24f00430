"""Run a recipe: its stages in order, each starting from the previous stage's final checkpoint.

Run directory:
    recipe.resolved.yaml   the recipe after `base:` and overrides (what actually ran)
    metrics.jsonl          one JSON object per logged step
    eval.jsonl             accuracy before the first stage and after each stage (when the recipe has `eval:`)
    init-model/            the model built from `model.new` (when the recipe builds one)
    <stage>/checkpoint-N/  intermediate checkpoints (HF files + learner/ state), keep-last-N
    <stage>/final/         the stage's HF checkpoint (LoRA merged): the next stage's starting point
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from posttrain import checkpoint
from posttrain.errors import UserError
from posttrain.recipe import Resolved, check_batch_geometry
from posttrain.stages import STAGE_KINDS
from posttrain.stages.context import StageContext
from posttrain.tracking import MetricsLog

RESOLVED_FILE = "recipe.resolved.yaml"


def default_run_dir(resolved: Resolved) -> Path:
    return Path(resolved.recipe.run_dir or f"runs/{resolved.recipe.name}")


def make_accelerator(resolved: Resolved, run_dir: Path):
    from posttrain.learner import new_accelerator

    recipe = resolved.recipe
    return new_accelerator(recipe.precision, trackers=list(recipe.tracking.trackers), project_dir=run_dir)


def _init_trackers(resolved: Resolved, acc) -> None:
    """After the run directory is checked: trackers write into it."""
    if resolved.recipe.tracking.trackers:
        acc.init_trackers(resolved.recipe.tracking.project or resolved.recipe.name, config=_flat(resolved.raw))


def _flat(data: dict, prefix: str = "") -> dict:
    """Trackers want flat scalar configs."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _prepare_run_dir(resolved: Resolved, run_dir: Path, resume: bool, acc) -> None:
    if acc.is_main_process:
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                f"run directory `{run_dir}` already holds a run: continue it with `--resume {run_dir}`, "
                f"or pass a new `--run-dir`"
            )
        if resume and not (run_dir / RESOLVED_FILE).is_file():
            raise UserError(f"--resume {run_dir}: no {RESOLVED_FILE} there, so there is no run to resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_resolved(resolved, run_dir, resume)
    acc.wait_for_everyone()


def _write_resolved(resolved: Resolved, run_dir: Path, resume: bool) -> None:
    path = run_dir / RESOLVED_FILE
    text = yaml.safe_dump(resolved.raw, sort_keys=False)
    if resume and path.read_text() != text:
        # Changing a recipe on resume is allowed (e.g. more steps); keep what ran before.
        previous = sorted(run_dir.glob(RESOLVED_FILE + ".prev*"))
        path.rename(run_dir / f"{RESOLVED_FILE}.prev{len(previous)}")
        print(f"[posttrain] the recipe differs from the one this run started with; previous kept beside it")
    path.write_text(text)


def _initial_model(resolved: Resolved, run_dir: Path, acc) -> Path:
    spec = resolved.recipe.model
    if spec.path is not None:
        return Path(spec.path) if Path(spec.path).exists() else spec.path
    from posttrain.models import build_new_model

    target = run_dir / "init-model"
    if acc.is_main_process:
        build_new_model(target, spec.new)
    acc.wait_for_everyone()
    return target


def _evaluate(resolved: Resolved, model_dir, label: str, run_dir: Path, acc) -> dict | None:
    """Greedy exact-match on the recipe's eval set (main process), appended to eval.jsonl."""
    spec = resolved.recipe.eval
    if spec is None:
        return None
    result = None
    if acc.is_main_process:
        from posttrain.evaluate import exact_match

        (run_dir / "eval").mkdir(exist_ok=True)
        result = {"model": label, **exact_match(model_dir, spec, run_dir / "eval" / f"{label}.jsonl")}
        with open(run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[posttrain] eval {label}: accuracy {result['accuracy']:.3f} on {result['n']} held-out rows")
    acc.wait_for_everyone()
    return result


def _evaluated(run_dir: Path) -> dict[str, dict]:
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return {}
    return {r["model"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def _rewind_metrics(log: MetricsLog, resolved: Resolved, run_dir: Path) -> None:
    """Keep metrics of finished stages and of steps up to each running stage's latest checkpoint."""
    limits = {}
    for stage in resolved.stages:
        stage_dir = run_dir / stage.name
        if checkpoint.final_checkpoint(stage_dir):
            limits[stage.name] = float("inf")
        else:
            latest = checkpoint.latest_checkpoint(stage_dir)
            limits[stage.name] = checkpoint.read_state(latest)["step"] if latest else 0
    log.rewind(lambda r: r.get("step", 0) <= limits.get(r.get("stage"), 0))


def run(resolved: Resolved, run_dir: Path | None = None, resume: bool = False) -> list[dict]:
    """Run every stage; return the eval table (one row per evaluated model)."""
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the training bar
    run_dir = Path(run_dir or default_run_dir(resolved))
    acc = make_accelerator(resolved, run_dir)
    check_batch_geometry(resolved, acc.num_processes)
    _prepare_run_dir(resolved, run_dir, resume, acc)
    _init_trackers(resolved, acc)
    log = MetricsLog(run_dir, acc)
    if resume:
        _rewind_metrics(log, resolved, run_dir)
    model_path = _initial_model(resolved, run_dir, acc)
    done_evals = _evaluated(run_dir) if resume else {}
    table = [done_evals.get("initial") or _evaluate(resolved, model_path, "initial", run_dir, acc)]
    from posttrain.models import load_tokenizer

    for index, stage in enumerate(resolved.stages):
        stage_dir = run_dir / stage.name
        final = checkpoint.final_checkpoint(stage_dir) if resume else None
        if final is None:
            set_seed(resolved.recipe.seed + 1000 * index)
            tokenizer = load_tokenizer(model_path, resolved.recipe.model.trust_remote_code)
            ctx = StageContext(acc, resolved.recipe, stage, index, model_path, tokenizer, run_dir, log, resume)
            final = STAGE_KINDS[stage.kind].run(ctx)
        model_path = final
        table.append(done_evals.get(stage.name) or _evaluate(resolved, final, stage.name, run_dir, acc))
    acc.end_training()
    rows = [row for row in table if row]
    if acc.is_main_process:
        _print_summary(run_dir, model_path, rows)
    return rows


def _print_summary(run_dir: Path, final: Path, rows: list[dict]) -> None:
    if rows:
        print("\n  model        accuracy   n")
        for row in rows:
            print(f"  {row['model']:<12} {row['accuracy']:>8.3f}   {row['n']}")
    print(f"\n[posttrain] done. final checkpoint: {final}\n[posttrain] metrics: {run_dir / 'metrics.jsonl'}")
