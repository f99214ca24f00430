"""Checkpoints: HF model files at the root (load with `AutoModelForCausalLM`), exact-resume learner state
in `learner/`, and `state.json` (stage, step, ...) written last.

Atomicity: everything is written into `.tmp-<name>/` and renamed to `<name>/` only when complete (files and
the rename fsync'd), so a crash mid-write never leaves a directory that looks like a checkpoint. Only
directories with a readable `state.json` count, and `state.json` lists every file with its size: a checkpoint
damaged later (a truncated file, a missing shard) is skipped with a warning naming it, and resume falls back to
the previous complete one. `keep_last` prunes the oldest intermediate ones. `write_atomic` is the same
write-then-rename for every other file a run rewrites (metrics.jsonl on resume, the resolved recipe).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

STATE_FILE = "state.json"
FINAL = "final"


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` survive a power cut (POSIX: fsync the directory itself)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash at any moment leaves either the old file or the new one:
    write a temporary file beside it, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_state(directory: Path) -> dict | None:
    """The checkpoint's `state.json`, or None when there is none or it cannot be read (cut short)."""
    path = Path(directory) / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def problem(directory: Path) -> str | None:
    """Why `directory` is not a usable checkpoint (unreadable `state.json`, a file it lists missing or of
    another size than written, e.g. truncated), or None when it is complete."""
    state = read_state(directory)
    if state is None:
        return f"{STATE_FILE} is missing or unreadable"
    for name, size in state.get("files", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


_REPORTED: set[Path] = set()


def _usable(directory: Path) -> bool:
    why = problem(directory)
    if why is not None and directory not in _REPORTED:
        _REPORTED.add(directory)
        warnings.warn(f"checkpoint {directory} is damaged ({why}); it is skipped: resuming from the previous "
                      f"complete one (delete it to silence this)", stacklevel=3)
    return why is None


def intermediate_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete `checkpoint-<step>` directories of a stage, oldest first (damaged ones skipped, with a warning)."""
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file() and _usable(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(stage_dir: Path) -> Path | None:
    found = intermediate_checkpoints(stage_dir)
    return found[-1] if found else None


def final_checkpoint(stage_dir: Path) -> Path | None:
    """The stage's `final/` checkpoint when it is complete (a damaged one: None, with a warning, so the stage
    runs again from its latest intermediate checkpoint)."""
    final = stage_dir / FINAL
    return final if (final / STATE_FILE).is_file() and _usable(final) else None


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
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_json(tmp / STATE_FILE, {**state, "files": files})  # `problem` checks these sizes on resume
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(stage_dir)
    acc.wait_for_everyone()
    return target


def prune(stage_dir: Path, keep_last: int) -> None:
    for old in intermediate_checkpoints(stage_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
