"""What an evaluation writes into its output directory:

    results.json    {"model", "engine", "seed", "created", "config": {bench: settings}, "metrics": {bench: {name:
                    value}, "average": {...}}, "info": {bench: timings and counts}, "total_s"}; values are
                    fractions in [0, 1] under the names papers use (pass@16, maj@16, avg@16, R1@0.5, mIoU, MR-mAP…)
    results.md      the same metrics as a markdown table, in percent (also printed)
    samples.jsonl   one line per problem / query: prompt, completions, extracted answers, scores
    results.png     pass@k / maj@k against k per math benchmark; R1@θ against θ per grounding benchmark

The JSON files are strict JSON (RFC 8259, what `jq` and other languages read): a non-finite number (a NaN span
in an annotation or a predictions file, a NaN metric) is written as `null`, never as a bare `NaN`/`Infinity`
(`dumps`). A grounding `samples.jsonl` is itself a valid predictions file (`posttrain eval --predictions`).
"""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path

from posttrain.evaluation.metrics import macro_average


def strict(value):
    """`value` as plain JSON data: non-finite floats become None, tuples and numpy arrays lists, numpy scalars
    numbers (so `json.dumps(..., allow_nan=False)` accepts it)."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
        return strict(value.tolist())
    return value


def dumps(value, **kwargs) -> str:
    """Strict JSON text of `value` (see `strict`); objects JSON has no type for are written as their str()."""
    return json.dumps(strict(value), allow_nan=False, default=str, **kwargs)


def _order(name: str) -> tuple:
    """pass@k, maj@k, avg@k by k; then grounding and QVHighlights names as they come."""
    m = re.fullmatch(r"(pass|maj|avg)@(\d+)", name)
    return (0, ("pass", "maj", "avg").index(m.group(1)), int(m.group(2))) if m else (1, 0, 0)


def metric_table(results: dict) -> dict[str, dict[str, float]]:
    """{bench: metrics} plus the macro `average` over benchmarks when there are several."""
    table = {name: r.metrics for name, r in results.items()}
    if len(table) > 1:
        table["average"] = macro_average(table)
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    seen = list(dict.fromkeys(n for m in table.values() for n in m))  # first-seen order
    names = sorted(seen, key=lambda n: (_order(n), seen.index(n)))
    lines = ["| benchmark | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for bench, values in table.items():
        cells = [f"{100 * values[n]:.2f}" if n in values else "–" for n in names]
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path, model: str, engine: str, seed: int, total_s: float) -> dict:
    """Write results.json, results.md, samples.jsonl and results.png; return the results.json content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = metric_table(results)
    config = {name: {"spec": r.spec.source, "task": r.spec.task, "verifier": r.spec.verifier.name,
                     "limit": r.spec.limit, **r.spec.sampling.model_dump(), "k": r.spec.metrics.k}
              for name, r in results.items()}
    doc = {"model": model, "engine": engine, "seed": seed,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "config": config, "metrics": table, "info": {name: r.info for name, r in results.items()},
           "total_s": total_s}
    (out_dir / "results.json").write_text(dumps(doc, indent=2) + "\n")
    (out_dir / "results.md").write_text(f"# {model}\n\n{markdown(table)}\n\nValues in percent.\n")
    with open(out_dir / "samples.jsonl", "w") as f:
        for r in results.values():
            for sample in r.samples:
                f.write(dumps(sample) + "\n")
    plot_results(results, out_dir / "results.png", title=model)
    return doc


def plot_results(results: dict, path: Path, title: str = "") -> Path | None:
    """pass@k and maj@k against k for each math benchmark; R1@θ against θ for each grounding benchmark."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    math_results = {n: r for n, r in results.items() if r.spec.task == "math"}
    grounding = {n: r for n, r in results.items() if r.spec.task == "grounding" and r.samples}
    panels = [p for p in (math_results, grounding) if p]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, group in zip(axes, panels):
        for i, (name, r) in enumerate(group.items()):
            color = f"C{i % 10}"
            if r.spec.task == "math":
                for kind, style in (("pass", "-o"), ("maj", "--s")):
                    points = sorted((int(k.split("@")[1]), v) for k, v in r.metrics.items() if k.startswith(kind + "@"))
                    if points:
                        ax.plot(*zip(*points), style, color=color, label=f"{name} {kind}@k", markersize=4)
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.set_xlabel("k (samples)")
                ax.set_ylabel("accuracy")
            else:
                thresholds = [t / 100 for t in range(5, 100, 5)]
                ious = [s["iou"] for s in r.samples]
                ax.plot(thresholds, [sum(v + 1e-9 >= t for v in ious) / len(ious) for t in thresholds], "-o",
                        color=color, label=f"{name} (mIoU {100 * r.metrics['mIoU']:.1f})", markersize=3)
                ax.set_xlabel("IoU threshold θ")
                ax.set_ylabel("R1@θ")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
