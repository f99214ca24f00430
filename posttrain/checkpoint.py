"""Checkpoints: HF model files at the root (load with `AutoModelForCausalLM`), exact-resume learner state
in `learner/`, and `state.json` (stage, step, ...) written last.

Atomicity: everything is written into `.tmp-<name>/` and renamed to `<name>/` only when complete, so a
crash mid-write never leaves a directory that looks like a checkpoint. Only directories with a
`state.json` count; `keep_last` prunes the oldest intermediate ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "state.json"
FINAL = "final"


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_state(directory: Path) -> dict | None:
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def intermediate_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete `checkpoint-<step>` directories of a stage, oldest first."""
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(stage_dir: Path) -> Path | None:
    found = intermediate_checkpoints(stage_dir)
    return found[-1] if found else None


def final_checkpoint(stage_dir: Path) -> Path | None:
    final = stage_dir / FINAL
    return final if (final / STATE_FILE).is_file() else None


def save(learner, tokenizer, stage_dir: Path, name: str, state: dict, *, with_learner_state: bool) -> Path:
    """Write checkpoint `name` atomically. Every process must call this (DeepSpeed writes shards)."""
    acc = learner.accelerator
    tmp, target = stage_dir / f".tmp-{name}", stage_dir / name
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if with_learner_state:
        learner.save_state(tmp / "learner")
    learner.export_hf(tmp, tokenizer, merge_lora=not with_learner_state)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_json(tmp / STATE_FILE, state)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    acc.wait_for_everyone()
    return target


def prune(stage_dir: Path, keep_last: int) -> None:
    for old in intermediate_checkpoints(stage_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
