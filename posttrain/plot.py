"""Plot a run's training curves from `run_dir/metrics.jsonl` into PNG files.

Each line of metrics.jsonl is one JSON object with at least `stage` (str) and `step` (int) plus numeric
metrics (`loss`, `lr`, `grad_norm`, `eval/loss`, `reward/mean`, ...). Stages are laid end to end in file
order on one global step axis, with a dashed line and the stage name at every boundary. Metrics are
grouped by the prefix before '/' (`reward/mean` and `reward/std` share the figure `reward.png`, one panel
each); timing keys go to `time.png`. With many points the raw values are drawn faintly under an
exponential moving average.

    posttrain plot runs/quickstart            # -> runs/quickstart/plots/*.png
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

from posttrain.errors import UserError

METRICS_FILE = "metrics.jsonl"
FIRST_GROUPS = ("loss", "lr", "grad_norm")  # always plotted first, each in its own figure
NON_METRIC_KEYS = {"stage", "step", "global_step", "timestamp", "wall_time", "epoch"}
TIME_PREFIXES = {"time", "timing", "perf", "throughput"}
TIME_SUFFIXES = ("time", "_s", "_sec", "_secs", "_seconds", "_ms", "elapsed", "per_sec", "per_s")
EMA_MIN_POINTS = 40  # below this many points per stage, draw the raw values only (with markers)
UNSMOOTHED = ("lr", "learning_rate")  # schedules: drawn exactly, never EMA-smoothed


class MetricsNotFoundError(UserError, FileNotFoundError):
    """metrics.jsonl is missing: a FileNotFoundError the CLI prints as one line (exit code 2)."""


def metrics_path(run_dir) -> Path:
    """`run_dir/metrics.jsonl` (or `run_dir` itself when it is the file); raise if it does not exist."""
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / METRICS_FILE
    if not path.is_file():
        where = f"run directory {run_dir} does not exist" if not Path(run_dir).exists() else f"{path} is missing"
        raise MetricsNotFoundError(
            f"no {METRICS_FILE} to plot: {where}. Pass the run directory a training run wrote "
            f"(the recipe's output dir, e.g. runs/quickstart)."
        )
    return path


def load_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file, skipping lines that do not parse (warns once with a count).

    A line that is not a JSON object or has no integer `step` is skipped; a missing `stage` takes the
    previous line's stage (or "train").
    """
    records, bad, first_bad, stage = [], 0, None, "train"
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = _parse_line(line)
            if rec is None:
                bad += 1
                first_bad = first_bad or lineno
                continue
            stage = str(rec.get("stage") or stage)
            records.append({**rec, "stage": stage})
    if bad:
        warnings.warn(f"{path}: skipped {bad} unparsable line(s) (first at line {first_bad}); "
                      f"a run that crashed mid-write leaves a truncated last line", stacklevel=2)
    return records


def _parse_line(line: str) -> dict | None:
    """One record, or None when the line is not a JSON object with an integer-valued `step`."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not _is_number(rec.get("step")) or not math.isfinite(rec["step"]):
        return None
    return rec


def _is_number(value) -> bool:
    """True for int/float values that are not bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stage_segments(records: list[dict]) -> list[dict]:
    """Contiguous runs of one stage, in file order, each with its records and a global-step offset.

    A stage whose steps restart (its first step is not past the previous stage's last global step) is
    shifted to start right after it; a stage that already logs global steps is left as it is.
    Returns dicts {name, records, offset, start, end} where start/end are global steps.
    """
    segments: list[dict] = []
    for rec in records:
        if not segments or segments[-1]["name"] != rec["stage"]:
            segments.append({"name": rec["stage"], "records": []})
        segments[-1]["records"].append(rec)
    prev_end = None
    for seg in segments:
        steps = [r["step"] for r in seg["records"]]
        lo, hi = min(steps), max(steps)
        seg["offset"] = 0 if prev_end is None or lo > prev_end else prev_end + 1 - lo
        seg["start"], seg["end"] = lo + seg["offset"], hi + seg["offset"]
        prev_end = seg["end"]
    return segments


def metric_group(key: str) -> str:
    """The figure a metric key goes to: its prefix before '/', or "time" for timing keys."""
    prefix = key.split("/", 1)[0]
    leaf = key.rsplit("/", 1)[-1].lower()
    if prefix.lower() in TIME_PREFIXES or leaf.endswith(TIME_SUFFIXES) or leaf.startswith("time"):
        return "time"
    return prefix


def numeric_keys(records: list[dict]) -> list[str]:
    """Keys with at least one numeric (non-bool, non-null) value, in first-seen order."""
    keys: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if key not in NON_METRIC_KEYS and _is_number(value):
                keys.setdefault(key, None)
    return list(keys)


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    """Metric keys by figure: loss, lr, grad_norm first, then the other groups by name, time last."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key if key in FIRST_GROUPS else metric_group(key), []).append(key)
    for name in groups:
        groups[name].sort(key=lambda k: (k not in FIRST_GROUPS, k))
    order = lambda name: (name not in FIRST_GROUPS, FIRST_GROUPS.index(name) if name in FIRST_GROUPS else 0,
                          name == "time", name)
    return {name: groups[name] for name in sorted(groups, key=order)}


def series(segment: dict, key: str) -> tuple[list[float], list[float]]:
    """(global steps, values) of `key` in one stage segment, skipping nulls and non-numbers."""
    xs, ys = [], []
    for rec in segment["records"]:
        value = rec.get(key)
        if _is_number(value) and math.isfinite(value):
            xs.append(rec["step"] + segment["offset"])
            ys.append(float(value))
    return xs, ys


def ema(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average with smoothing α = 2/(span+1).

    Started from 0 and divided by 1 − (1−α)^t (as Adam's moments), so the first points are the mean of what
    has been seen instead of the first, noisy value dragged along for `span` steps."""
    alpha, out, avg, weight = 2.0 / (span + 1), [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _draw_panel(ax, segments: list[dict], key: str) -> None:
    """One metric on one axes: a line per stage (raw faint + EMA when dense), stage boundaries, labels."""
    all_ys = []
    for i, seg in enumerate(segments):
        xs, ys = series(seg, key)
        if not xs:
            continue
        all_ys += ys
        color = f"C{i % 10}"
        if key.rsplit("/", 1)[-1] in UNSMOOTHED:
            ax.plot(xs, ys, color=color, linewidth=1.6)
        elif len(xs) >= EMA_MIN_POINTS:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, ema(ys, max(2, len(xs) // 10)), color=color, linewidth=1.8)
        else:
            ax.plot(xs, ys, color=color, linewidth=1.4, marker="o", markersize=3)
    _mark_stages(ax, segments)
    lo, hi = segments[0]["start"], segments[-1]["end"]
    pad = max(1.0, (hi - lo) * 0.02)
    ax.set_xlim(lo - pad, hi + pad)  # every figure spans the whole run, so stages line up across files
    finite = [y for y in all_ys if math.isfinite(y)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        ax.set_yscale("log")
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("global step")
    ax.set_ylabel(key.rsplit("/", 1)[-1])
    ax.grid(True, alpha=0.3)


def _mark_stages(ax, segments: list[dict]) -> None:
    """Dashed vertical lines between stages and the stage names along the top of the axes."""
    transform = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    for i, seg in enumerate(segments):
        if i > 0:
            x = (segments[i - 1]["end"] + seg["start"]) / 2
            ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
        else:
            x = seg["start"]
        ax.text(x, 0.98, f" {seg['name']}", transform=transform, va="top", ha="left", fontsize=8,
                color=f"C{i % 10}", fontweight="bold", clip_on=True)


def _figure(segments: list[dict], group: str, keys: list[str], title: str):
    """A matplotlib Figure (Agg canvas, no pyplot state) with one panel per key of the group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.2 * cols if cols > 1 else 8, 3.6 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _draw_panel(ax, segments, key)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {group}", fontsize=12)
    return fig


def _file_name(group: str) -> str:
    """A safe PNG file name for a group."""
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", group).strip("._") or "metric") + ".png"


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write one PNG per metric group of `run_dir/metrics.jsonl` to `out_dir` (default run_dir/plots).

    Returns the written paths (loss, lr, grad_norm first). Raises FileNotFoundError (a UserError too)
    when metrics.jsonl is missing; returns [] when it has no numeric metrics.
    """
    path = metrics_path(run_dir)
    records = load_metrics(path)
    if not records:
        return []
    segments = stage_segments(records)
    out = Path(out_dir) if out_dir is not None else path.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = path.parent.name or str(path.parent)
    written = []
    for group, keys in group_keys(numeric_keys(records)).items():
        fig = _figure(segments, group, keys, title)
        target = out / _file_name(group)
        fig.savefig(target, dpi=110)
        written.append(target)
    return written


def add_plot_arguments(parser) -> None:
    """Flags of `posttrain plot`: positional run_dir and --out DIR."""
    parser.add_argument("run_dir", help="run directory that holds metrics.jsonl (or the metrics.jsonl file)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run_plot(ns) -> int:
    """Plot `ns.run_dir` into `ns.out`, print the written paths; 0 on success, 1 if nothing to plot."""
    paths = plot_run(ns.run_dir, ns.out)
    if not paths:
        print(f"nothing to plot: {metrics_path(ns.run_dir)} has no metric lines yet")
        return 1
    for p in paths:
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m posttrain.plot RUN_DIR [--out DIR]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m posttrain.plot", description="Plot a run's metrics.jsonl.")
    add_plot_arguments(parser)
    try:
        return run_plot(parser.parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
