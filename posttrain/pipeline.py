"""Run a recipe: its stages in order, each starting from the previous stage's final checkpoint.

Run directory:
    recipe.resolved.yaml   the recipe after `base:` and overrides (what actually ran)
    metrics.jsonl          one JSON object per logged step
    eval.jsonl             benchmark results before the first stage and after each stage (recipe `eval:`)
    eval/<model>.jsonl     every prompt, completion and score of those evaluations
    init-model/            the model built from `model.new` (when the recipe builds one)
    <stage>/checkpoint-N/  intermediate checkpoints (HF files + learner/ state), keep-last-N
    <stage>/final/         the stage's HF checkpoint (LoRA merged): the next stage's starting point
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from posttrain import checkpoint
from posttrain.errors import UserError
from posttrain.evaluation.training import TrainingEval
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
        check_writable(run_dir)
        _write_resolved(resolved, run_dir, resume)
    acc.wait_for_everyone()


MIN_FREE_BYTES = 256 * 2**20  # below this, the first checkpoint of even a small model would not fit


def check_writable(run_dir: Path) -> None:
    """Before any model loads: the run directory can be made and written, and its disk is not full."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"run directory `{run_dir}`: `{parent}` is a file, not a directory")
            break
    probe = run_dir / ".posttrain-write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run directory `{run_dir}` cannot be written: {err.strerror or err} "
                        f"(`{err.filename or probe}`)") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"run directory `{run_dir}`: only {free / 2**20:.0f} MiB free on its disk "
                        f"(at least {MIN_FREE_BYTES // 2**20} MiB needed for checkpoints); free space or pass "
                        f"another --run-dir")


def _write_resolved(resolved: Resolved, run_dir: Path, resume: bool) -> None:
    path = run_dir / RESOLVED_FILE
    text = yaml.safe_dump(resolved.raw, sort_keys=False)
    if resume and path.read_text() != text:
        # Changing a recipe on resume is allowed (e.g. more steps); keep what ran before.
        previous = sorted(run_dir.glob(RESOLVED_FILE + ".prev*"))
        path.rename(run_dir / f"{RESOLVED_FILE}.prev{len(previous)}")
        print(f"[posttrain] the recipe differs from the one this run started with; previous kept beside it")
    checkpoint.write_atomic(path, text)


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
    evaluation = TrainingEval(resolved, run_dir, acc, log) if resolved.recipe.eval else None
    try:
        final, rows = _run_stages(resolved, run_dir, acc, log, resume, model_path, evaluation)
    finally:
        if evaluation is not None:
            evaluation.close()
    acc.end_training()
    if acc.is_main_process:
        _print_summary(run_dir, final, rows)
    return rows


def _run_stages(resolved, run_dir, acc, log, resume, model_path, evaluation) -> tuple[Path, list[dict]]:
    """Run (or skip, when resuming, the finished) stages in order; return the last final checkpoint and the
    eval rows (one per evaluated model; main process only)."""
    from accelerate.utils import set_seed

    from posttrain.models import load_tokenizer

    done = evaluation.done() if evaluation is not None and resume else {}
    first = resolved.stages[0].name
    table = []
    if evaluation is not None and evaluation.spec.initial:
        table.append(done.get("initial") or evaluation.checkpoint(model_path, "initial", first, 0))
    for index, stage in enumerate(resolved.stages):
        stage_dir = run_dir / stage.name
        final = checkpoint.final_checkpoint(stage_dir) if resume else None
        if final is None:
            set_seed(resolved.recipe.seed + 1000 * index)
            tokenizer = load_tokenizer(model_path, resolved.recipe.model.trust_remote_code)
            ctx = StageContext(acc, resolved.recipe, stage, index, model_path, tokenizer, run_dir, log, resume,
                               evaluation)
            final = STAGE_KINDS[stage.kind].run(ctx)
        model_path = final
        if evaluation is not None:
            step = (checkpoint.read_state(final) or {}).get("step", 0)
            table.append(done.get(stage.name) or evaluation.checkpoint(final, stage.name, stage.name, step))
    return model_path, [row for row in table if row]


def _print_summary(run_dir: Path, final: Path, rows: list[dict]) -> None:
    """One line per evaluated model, one column per benchmark metric (pass@1 first)."""
    if rows:
        columns = list(dict.fromkeys((b, m) for row in rows for b, ms in row["metrics"].items() for m in ms))
        width = max(22, *(len(f"{b} {m}") + 2 for b, m in columns))
        head = "".join(f"{f'{b} {m}':>{width}}" for b, m in columns)
        print(f"\n  {'model':<14}{head}")
        for row in rows:
            cells = "".join(f"{row['metrics'].get(b, {}).get(m, float('nan')):>{width}.3f}" for b, m in columns)
            print(f"  {row['model']:<14}{cells}")
    print(f"\n[posttrain] done. final checkpoint: {final}\n[posttrain] metrics: {run_dir / 'metrics.jsonl'}")
