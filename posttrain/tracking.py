"""Metrics: `metrics.jsonl` always (one JSON object per step, flushed per line so a crash loses nothing
logged), Accelerate trackers (tensorboard, wandb, trackio) when the recipe asks, and a tqdm progress bar
on the main process."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from posttrain.checkpoint import write_atomic

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; keep the line parseable
    return value


class MetricsLog:
    def __init__(self, run_dir: Path, accelerator):
        self.path = Path(run_dir) / METRICS_FILE
        self.accelerator = accelerator
        self.global_step = 0  # step across all stages, for the trackers' x-axis

    def rewind(self, keep) -> None:
        """On resume, drop lines logged after the checkpoint we resume from (they will be logged again).
        `keep(record) -> bool` says which lines to keep."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if keep(record):
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))  # a kill now leaves old or new

    def log(self, stage: str, step: int, metrics: dict) -> None:
        self.global_step += 1
        self.log_extra(stage, step, metrics)

    def log_extra(self, stage: str, step: int, metrics: dict) -> None:
        """Write a record at `step` of `stage` and send it to the trackers at the current global step, without
        advancing it (`log` advances it first: one call per training step; evaluations call this)."""
        if not self.accelerator.is_main_process:
            return
        record = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            numeric = {f"{stage}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.accelerator.log(numeric, step=self.global_step)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    # In a log file (no TTY) redraw rarely instead of writing thousands of carriage-return updates.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step",
                mininterval=interval)
