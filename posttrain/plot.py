"""Plot a run's training curves from `run_dir/metrics.jsonl` into PNG files.

Each line of metrics.jsonl is one JSON object with at least `stage` (str) and `step` (int), the wall clock
`time` and numeric metrics (`loss`, `lr`, `grad_norm`, `eval/loss`, `reward/total/mean`, ...). Stages are
laid end to end in file order on one global step axis. Metrics are grouped by the prefix before '/'
(`reward/mean` and `reward/std` share the figure `reward.png`, one panel each); timing keys go to `time.png`.

* A panel spans only the stages that log its metric (GRPO's reward does not leave the SFT steps empty), with
  a dashed line and the stage name at every stage boundary inside it.
* A training loss gets one panel per stage kind (SFT's NLL and GRPO's surrogate, ~1e-9, are different
  objectives), and any metric whose stages differ in scale by more than `SCALE_RATIO` gets one panel per
  scale, so no stage is flattened against another.
* Held-out evaluation (`eval/...` keys, plus the rows of `eval.jsonl` beside metrics.jsonl that
  metrics.jsonl lacks) is one connected curve across stages, each point coloured by its stage.
* The wall clock is drawn as the elapsed time since the first logged line (in s, min or h); the timing
  metrics (`time/step`, ...) are labelled in seconds.

With many points the raw values are drawn faintly under an exponential moving average.

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
EVAL_FILE = "eval.jsonl"  # posttrain.evaluation.training.EVAL_FILE: one row per evaluated checkpoint
RESOLVED_FILE = "recipe.resolved.yaml"  # posttrain.pipeline.RESOLVED_FILE: says each stage's kind
FIRST_GROUPS = ("loss", "lr", "grad_norm")  # always plotted first, each in its own figure
WALL_CLOCK_KEYS = ("time", "timestamp", "wall_time")  # epoch seconds: drawn as ELAPSED_KEY instead
ELAPSED_KEY = "time/elapsed"  # seconds since the first logged line, added by add_elapsed
NON_METRIC_KEYS = {"stage", "step", "global_step", "epoch", *WALL_CLOCK_KEYS}
TIME_PREFIXES = {"time", "timing", "perf", "throughput"}
TIME_SUFFIXES = ("time", "_s", "_sec", "_secs", "_seconds", "_ms", "elapsed", "per_sec", "per_s")
EMA_MIN_POINTS = 40  # below this many points per stage, draw the raw values only (with markers)
UNSMOOTHED = ("lr", "learning_rate")  # schedules: drawn exactly, never EMA-smoothed
STAGE_BOUNDARY = "stage-boundary"  # gid of the dashed lines between stages (tells them from data lines)
SCALE_RATIO = 30.0  # stages whose typical |value| differ by more than this share no panel


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


def add_elapsed(records: list[dict]) -> None:
    """Give every record with a wall clock (`time`, epoch seconds) `ELAPSED_KEY`: seconds since the earliest."""
    stamps = [(rec, _wall_clock(rec)) for rec in records]
    known = [t for _, t in stamps if t is not None]
    if not known:
        return
    start = min(known)
    for rec, t in stamps:
        if t is not None:
            rec[ELAPSED_KEY] = t - start


def _wall_clock(rec: dict) -> float | None:
    """The record's wall clock in epoch seconds, or None."""
    for key in WALL_CLOCK_KEYS:
        value = rec.get(key)
        if _is_number(value) and math.isfinite(value):
            return float(value)
    return None


def load_eval_rows(path) -> list[dict]:
    """The rows of an eval.jsonl as metrics records {stage, step, eval/<bench>/<metric>: value}; [] when the
    file is missing, and lines that are not such rows are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(row, dict) and isinstance(row.get("stage"), str) and _is_number(row.get("step"))
                and isinstance(row.get("metrics"), dict)):
            continue
        flat = {f"eval/{bench}/{metric}": value for bench, values in row["metrics"].items()
                if isinstance(values, dict) for metric, value in values.items() if _is_number(value)}
        if flat:
            out.append({"stage": row["stage"], "step": row["step"], **flat})
    return out


def merge_eval_rows(segments: list[dict], rows: list[dict]) -> None:
    """Add to each stage segment the eval.jsonl results that its metrics.jsonl lines lack (a run from before
    evaluations were logged there, or lines lost to a crash). A row whose stage logged nothing is dropped."""
    for row in rows:
        seg = next((s for s in reversed(segments) if s["name"] == row["stage"]), None)
        if seg is None:
            continue
        logged = {key for rec in seg["records"] if rec["step"] == row["step"] for key in rec}
        missing = {k: v for k, v in row.items() if k.startswith("eval/") and k not in logged}
        if missing:
            seg["records"].append({"stage": row["stage"], "step": row["step"], **missing})
            x = row["step"] + seg["offset"]
            seg["start"], seg["end"] = min(seg["start"], x), max(seg["end"], x)


def stage_kinds(path) -> dict[str, str]:
    """{stage name: kind} from a run's recipe.resolved.yaml (a stage's kind is its name unless `kind:` says
    otherwise); {} when the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        return {}
    return {str(name): str((spec.get("kind") if isinstance(spec, dict) else None) or name)
            for name, spec in stages.items()}


def metric_group(key: str) -> str:
    """The figure a metric key goes to: its prefix before '/', or "time" for timing keys."""
    prefix = key.split("/", 1)[0]
    leaf = key.rsplit("/", 1)[-1].lower()
    if prefix.lower() in TIME_PREFIXES or leaf.endswith(TIME_SUFFIXES) or _is_time_leaf(leaf):
        return "time"
    return prefix


def _is_time_leaf(leaf: str) -> bool:
    """`time`, `time_gen`, `timer`... but not `timeouts` (a verifier count)."""
    return leaf == "time" or (leaf.startswith("time") and not leaf.startswith("timeout"))


def numeric_keys(records: list[dict]) -> list[str]:
    """Keys with at least one numeric (non-bool, non-null) value, in first-seen order."""
    keys: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if key not in NON_METRIC_KEYS and _is_number(value):
                keys.setdefault(key, None)
    return list(keys)


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    """Metric keys by figure: loss, lr, grad_norm first, then the other groups by name, time last (its
    elapsed time first)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key if key in FIRST_GROUPS else metric_group(key), []).append(key)
    for name in groups:
        groups[name].sort(key=lambda k: (k not in FIRST_GROUPS, k != ELAPSED_KEY, k))
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


def is_joined(key: str) -> bool:
    """Drawn as one connected curve across stages: held-out evaluation and the elapsed time measure the same
    thing in every stage (a training loss or a reward does not)."""
    return key == ELAPSED_KEY or key.startswith("eval/")


def _is_objective(key: str) -> bool:
    """A training loss: what it measures depends on the stage kind (NLL, a policy-gradient surrogate, ...)."""
    leaf = key.rsplit("/", 1)[-1]
    return not key.startswith("eval/") and (leaf == "loss" or leaf.endswith("_loss"))


def _scale(values: list[float]) -> float:
    """A stage's typical magnitude: the 90th percentile of |value| (robust to a first-step spike)."""
    mags = sorted(abs(v) for v in values)
    return mags[min(len(mags) - 1, int(0.9 * len(mags)))]


def _same_scale(scales: list[float]) -> bool:
    """Whether stages of these typical magnitudes read well on one axis: the non-zero ones within SCALE_RATIO
    (a stage that is all zeros reads as a flat zero on any axis)."""
    nonzero = [s for s in scales if s > 0]
    return not nonzero or max(nonzero) <= SCALE_RATIO * min(nonzero)


def metric_panels(segments: list[dict], key: str, kinds: dict[str, str] | None = None) -> list[dict]:
    """The panels that draw `key`: dicts {key, segments (indices of the stages drawn), joined, title}.

    A joined key (evaluation, elapsed time) is one panel over every stage that logs it. Any other key is
    split into groups of stages that share a kind (for a training loss, when `kinds` knows the stages) and a
    scale (typical magnitudes within SCALE_RATIO), one panel each, in stage order.
    """
    kinds = kinds or {}
    values = {i: series(seg, key)[1] for i, seg in enumerate(segments)}
    present = [i for i, ys in values.items() if ys]
    if not present:
        return []
    if is_joined(key):
        return [{"key": key, "segments": present, "joined": True, "title": _title(key)}]
    by_kind: dict[str | None, list[int]] = {}
    for i in present:
        by_kind.setdefault(kinds.get(segments[i]["name"]) if _is_objective(key) else None, []).append(i)
    groups: list[list[int]] = []
    for members in by_kind.values():
        split: list[list[int]] = []
        for i in members:
            s = _scale(values[i])
            home = next((g for g in split if _same_scale([_scale(values[j]) for j in g] + [s])), None)
            if home is None:
                split.append([i])
            else:
                home.append(i)
        groups += split
    groups.sort(key=lambda g: g[0])
    panels = []
    for g in groups:
        title = _title(key) if len(groups) == 1 else f"{_title(key)} · {', '.join(segments[i]['name'] for i in g)}"
        panels.append({"key": key, "segments": g, "joined": False, "title": title})
    return panels


def _title(key: str) -> str:
    return "elapsed wall-clock time" if key == ELAPSED_KEY else key


def _time_unit(seconds: float) -> tuple[str, float]:
    """(unit, seconds per unit) that keeps an elapsed time readable."""
    if seconds < 120:
        return "s", 1.0
    if seconds < 2 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _ylabel(key: str, unit: str | None) -> str:
    """The leaf of the key, with its unit when it is a time (timing metrics are measured in seconds)."""
    leaf = key.rsplit("/", 1)[-1]
    if key == ELAPSED_KEY:
        return f"elapsed ({unit})"
    if metric_group(key) != "time":
        return key if leaf == "s" else leaf  # tokens/s, not "s"
    low = leaf.lower()
    if low.endswith(("per_sec", "per_s")):
        return f"{leaf} (1/s)"
    return f"{leaf} (ms)" if low.endswith("_ms") else f"{leaf} (s)"


def _draw_panel(ax, segments: list[dict], panel: dict) -> None:
    """One panel: a line per stage (raw faint + EMA when dense), or one connected line across stages for a
    joined key; x spanning only the panel's stages, their boundaries marked; labels with units."""
    key, members = panel["key"], panel["segments"]
    per_stage = {i: series(segments[i], key) for i in members}
    unit, per_unit = None, 1.0
    if key == ELAPSED_KEY:
        unit, per_unit = _time_unit(max(max(ys) for _, ys in per_stage.values()))
    all_ys = []
    if panel["joined"]:
        points = sorted(((x, y / per_unit, i) for i, (xs, ys) in per_stage.items() for x, y in zip(xs, ys)),
                        key=lambda p: p[0])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        all_ys = ys
        ax.plot(xs, ys, color="0.3", linewidth=1.6)
        if len(points) < EMA_MIN_POINTS:
            ax.scatter(xs, ys, c=[f"C{p[2] % 10}" for p in points], s=24, zorder=3)
    else:
        for i, (xs, ys) in per_stage.items():
            all_ys += ys
            color = f"C{i % 10}"
            if key.rsplit("/", 1)[-1] in UNSMOOTHED:
                ax.plot(xs, ys, color=color, linewidth=1.6)
            elif len(xs) >= EMA_MIN_POINTS:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, max(2, len(xs) // 10)), color=color, linewidth=1.8)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.4, marker="o", markersize=3)
    first, last = min(members), max(members)
    _mark_stages(ax, segments, first, last)
    lo, hi = segments[first]["start"], max(segments[i]["end"] for i in range(first, last + 1))
    pad = max(1.0, (hi - lo) * 0.02)
    ax.set_xlim(lo - pad, hi + pad)  # only the stages that log this metric
    finite = [y for y in all_ys if math.isfinite(y)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        ax.set_yscale("log")
    ax.set_title(panel["title"], fontsize=10)
    ax.set_xlabel("global step")
    ax.set_ylabel(_ylabel(key, unit))
    ax.grid(True, alpha=0.3)


def _mark_stages(ax, segments: list[dict], first: int, last: int) -> None:
    """Dashed vertical lines between stages `first`..`last` and their names along the top of the axes."""
    transform = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    for i in range(first, last + 1):
        seg = segments[i]
        if i > first:
            x = (segments[i - 1]["end"] + seg["start"]) / 2
            ax.axvline(x, color="0.4", linestyle="--", linewidth=1, gid=STAGE_BOUNDARY)
        else:
            x = seg["start"]
        ax.text(x, 0.98, f" {seg['name']}", transform=transform, va="top", ha="left", fontsize=8,
                color=f"C{i % 10}", fontweight="bold", clip_on=True)


def _figure(segments: list[dict], group: str, panels: list[dict], title: str):
    """A matplotlib Figure (Agg canvas, no pyplot state) with the given panels of one group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols if cols > 1 else 8, 3.6 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, segments, panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {group}", fontsize=12)
    return fig


def _file_name(group: str) -> str:
    """A safe PNG file name for a group."""
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", group).strip("._") or "metric") + ".png"


def run_figures(run_dir):
    """Yield (group, Figure) for every metric group of a run, one figure at a time: metrics.jsonl, plus
    eval.jsonl and the stage kinds of recipe.resolved.yaml beside it when present. Raises
    MetricsNotFoundError (on the first item) when metrics.jsonl is missing."""
    path = metrics_path(run_dir)
    records = load_metrics(path)
    if not records:
        return
    add_elapsed(records)
    segments = stage_segments(records)
    merge_eval_rows(segments, load_eval_rows(path.parent / EVAL_FILE))
    kinds = stage_kinds(path.parent / RESOLVED_FILE)
    title = path.parent.name or str(path.parent)
    for group, keys in group_keys(numeric_keys([r for seg in segments for r in seg["records"]])).items():
        panels = [panel for key in keys for panel in metric_panels(segments, key, kinds)]
        yield group, _figure(segments, group, panels, title)


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write one PNG per metric group of `run_dir/metrics.jsonl` to `out_dir` (default run_dir/plots).

    Returns the written paths (loss, lr, grad_norm first). Raises FileNotFoundError (a UserError too)
    when metrics.jsonl is missing; returns [] when it has no numeric metrics.
    """
    out = Path(out_dir) if out_dir is not None else metrics_path(run_dir).parent / "plots"
    written = []
    for group, fig in run_figures(run_dir):
        out.mkdir(parents=True, exist_ok=True)
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
