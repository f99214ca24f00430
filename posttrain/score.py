"""`posttrain score VERIFIER FILE.jsonl`: grade saved completions with one verifier, exactly as training does.

Each line of FILE.jsonl is a JSON object with a `completion` (string), the columns the verifier reads (e.g.
`answer`), and optionally `prompt` and `completion_ids` (token ids; the `length` reward needs them). Rows are
scored by the same `Scorer` as training (worker processes, per-row timeout, fallback on failure) and a summary
is printed; `--out` writes the rows back with a `score` field (null where the verifier abstained) and, on rows
that failed, a `score_error` field.

    posttrain score math completions.jsonl --out scored.jsonl
    posttrain score length completions.jsonl --kwargs '{"max_tokens": 4096, "cache": 512}'
    posttrain score my_rewards.py:brevity completions.jsonl --timeout 2
"""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

from posttrain.errors import UserError

KNOWN_FIELDS = ("completion", "prompt", "completion_ids")
OUTPUT_FIELDS = ("score", "score_error")  # ours: ignored when reading a file we wrote


def add_score_arguments(parser) -> None:
    parser.add_argument("verifier", help="reward name (math, exact, format, length, a registered name), "
                                         "module:function or path/to/file.py:function")
    parser.add_argument("file", help="JSONL rows: `completion`, the columns the verifier reads, "
                                     "optional `prompt` and `completion_ids`")
    parser.add_argument("--out", metavar="OUT.jsonl", default=None,
                        help="write the rows back with a `score` field (default: print the summary only)")
    parser.add_argument("--kwargs", metavar="JSON", default=None,
                        help="verifier settings as a JSON object, e.g. '{\"max_tokens\": 4096}'")
    parser.add_argument("--timeout", metavar="S", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--fallback", metavar="X", type=float, default=0.0,
                        help="score of a row that fails (default 0)")
    parser.add_argument("--workers", metavar="N", type=int, default=2,
                        help="worker processes (default 2; 0 = in-process, no timeouts)")
    parser.add_argument("--examples", metavar="N", type=int, default=3, help="failing rows to show (default 3)")


def run_score(ns) -> int:
    from pydantic import ValidationError

    from posttrain.reward import RewardSpec, RewardWarning, Scorer

    kwargs = _parse_kwargs(ns.kwargs)
    try:
        spec = RewardSpec(name=ns.verifier, kwargs=kwargs, timeout=ns.timeout, fallback=ns.fallback)
    except ValidationError as err:
        raise UserError(f"bad score options: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}") from err
    lines, rows = read_rows(ns.file)
    completions = [r["completion"] for r in rows]
    prompts = [r.get("prompt") for r in rows]
    has_ids = any("completion_ids" in r for r in rows)
    completion_ids = [r.get("completion_ids") for r in rows] if has_ids else None
    names = sorted({k for r in rows for k in r if k not in KNOWN_FIELDS and k not in OUTPUT_FIELDS})
    columns = {name: [r.get(name) for r in rows] for name in names}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardWarning)  # the summary below lists the failures
        with Scorer([spec], workers=ns.workers) as scorer:
            try:
                result = scorer.score(prompts, completions, completion_ids, columns)
            except UserError as err:
                raise UserError(f"{ns.file}: {err}") from err

    key = spec.key
    scores = result.per_reward[key]
    errors = {row: f"{kind}: {message}" for _, row, kind, message in result.issues}
    if ns.out:
        _write(ns.out, rows, scores, errors)
    print(summary(key, ns.file, scores, result, lines, completions, ns.examples))
    if ns.out:
        print(f"wrote {ns.out} ({len(rows)} rows)")
    return 0


def summary(key, path, scores, result, lines, completions, examples: int = 3) -> str:
    scored = [s for s in scores if s is not None]
    mean = f"{statistics.fmean(scored):.4f}" if scored else "n/a"
    text = (f"{key} on {path}: n={len(scores)} mean={mean} abstained={result.abstained[key]} "
            f"failures={result.failures[key]} timeouts={result.timeouts[key]} ({result.seconds:.1f} s)")
    shown = result.issues[:examples]
    if shown:
        text += "\nfailing rows:"
        for _, row, kind, message in shown:
            preview = " ".join(completions[row].split())
            preview = preview if len(preview) <= 60 else preview[:57] + "..."
            text += f"\n  line {lines[row]}: {kind}: {message}\n    completion: {preview!r}"
        if len(result.issues) > examples:
            text += f"\n  ... and {len(result.issues) - examples} more"
    return text


def read_rows(path) -> tuple[list[int], list[dict]]:
    """(line numbers, rows) of a JSONL file; UserError naming the file and line for anything malformed."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file")
    lines, rows = [], []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from err
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("completion"), str):
                got = "no `completion` field" if "completion" not in row else "`completion` is not a string"
                raise UserError(f"{where}: {got} (each row needs a `completion` string; fields: "
                                f"{', '.join(row) or 'none'})")
            ids = row.get("completion_ids")
            if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
                raise UserError(f"{where}: `completion_ids` must be a list of integers")
            lines.append(lineno)
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows to score")
    return lines, rows


def _parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--kwargs is not valid JSON ({err.msg}): {text}") from err
    if not isinstance(value, dict):
        raise UserError(f"--kwargs must be a JSON object like '{{\"max_tokens\": 4096}}', got {text}")
    return value


def _write(path, rows, scores, errors) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for i, (row, score) in enumerate(zip(rows, scores)):
            row = {k: v for k, v in row.items() if k not in OUTPUT_FIELDS}
            row["score"] = score
            if i in errors:
                row["score_error"] = errors[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
