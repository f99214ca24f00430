"""Score a predictions file (one JSON object per line) with a benchmark's metrics: the same metric names as
running a model (`runner.Evaluator`), and a grounding evaluation's `samples.jsonl` is itself a predictions file.
What is an error (exit 2, naming file:line) and what is only counted: `score_predictions`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from posttrain.data import load_benchmark_rows
from posttrain.errors import UserError
from posttrain.evaluation import grounding
from posttrain.evaluation.runner import BenchResult, jsonable, parsed_span, query_of
from posttrain.recipe.benchmark import BenchmarkSpec, data_path


ROW_FORMAT = ('{"video": ..., "query": ..., "prediction": model text or [start, end]} '
              '(a grounding evaluation\'s samples.jsonl is one too)')
QVH_FORMAT = ('the official submission format {"qid": ..., "pred_relevant_windows": [[start, end, score], ...], '
              '"pred_saliency_scores": [...]}, or a QVHighlights evaluation\'s samples.jsonl')


def _describe(value) -> str:
    """How a JSON value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:60]!r}"
    return "a list" if isinstance(value, list) else "an object"


def read_predictions(path: str, expected: str = ROW_FORMAT) -> list[tuple[int, dict]]:
    """(line number, row) of every non-empty line; a line that is not JSON, or not a JSON object, is a UserError
    naming `path:line` and `expected`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"predictions file `{path}` " + ("is a directory" if file.is_dir() else "not found"))
    rows = []
    try:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); expected one "
                                    f"JSON object per line: {expected}") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {_describe(row)}; each line "
                                    f"holds one: {expected}")
                rows.append((number, row))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not rows:
        raise UserError(f"predictions file `{path}` is empty; expected one JSON object per line: {expected}")
    return rows


def _this_benchmark(spec: BenchmarkSpec, rows: list[tuple[int, dict]]) -> tuple[list[tuple[int, dict]], int]:
    """The rows of `spec`'s benchmark when the file holds samples of several (their `benchmark` field), and how
    many rows of other benchmarks were left out. A file without rows for `spec.name` is used whole."""
    if not any(p.get("benchmark") == spec.name for _, p in rows):
        return rows, 0
    kept = [(n, p) for n, p in rows if p.get("benchmark", spec.name) == spec.name]
    return kept, len(rows) - len(kept)


def _first_free(indices, taken) -> int | None:
    return next((i for i in indices or () if i not in taken), None)


def _lines(numbers: list[int], most: int = 5) -> str:
    return ", ".join(map(str, numbers[:most])) + (", …" if len(numbers) > most else "")


def score_predictions(spec: BenchmarkSpec, predictions_path: str, data: str | None = None) -> BenchResult:
    """Grounding metrics of a predictions file against the benchmark's annotations, under the metric names of a
    model's evaluation (`posttrain.evaluation.grounding`).

    Formats (one JSON object per line):
      Charades-STA, ActivityNet, jsonl annotations: `{"video", "query", "prediction"}`, `prediction` model text
        or `[start, end]` seconds (`completion` is read when there is no `prediction`). A row is matched to the
        first annotation without a prediction that has its video id and query (spaces around the query ignored;
        the spec's prompt column is tried as well). A grounding evaluation's samples.jsonl is such a file: scored
        with the same `--bench`, `--data` and `--limit` it gives the evaluation's metrics (when no video was
        skipped); rows whose `benchmark` names another benchmark are left out when the file has rows for this one.
      QVHighlights: the official submission format `{"qid", "pred_relevant_windows", "pred_saliency_scores"}`,
        or a QVHighlights evaluation's samples (`qid` and `prediction`: the parsed span is the one window, as the
        evaluation scores it).

    Errors (a UserError naming `file:line` and what was expected; nothing is scored): a line that is not JSON or
    not a JSON object (`null`, a number, a list, a string); a row without `video`, `query` or `prediction`
    (QVHighlights: without `qid`, or with neither windows, saliency scores nor a prediction); a `video` that is not
    a video id (a string or an integer; not a list, object or null) or a `query` that is not a string; QVHighlights
    windows / saliency scores that are not lists of finite numbers, or fields only some rows have; a file in which
    no row matches an annotation.

    Skipped or counted, never an error (counts in `info`, so in results.json; the CLI prints `warnings`):
      missing_predictions     annotations without a prediction: IoU 0, so R1@θ and mIoU stay over all
                              annotations (of the first `--limit`). QVHighlights, as the official evaluation without
                              its match check, averages over the predicted queries only.
      unparsable_predictions  predictions that name no finite span (text without one, null, a number, [NaN, 5]):
                              IoU 0.
      unmatched_predictions   rows matching no annotation (an unknown video or query, or a second row for the same
                              query): ignored.
      other_benchmark_rows    rows of other benchmarks in a samples.jsonl: ignored.
      bad_annotations         annotations whose span is not a finite [start, end]: IoU 0.
    """
    started = time.perf_counter()
    path = data_path(spec, data)
    gts = load_benchmark_rows(path, spec.data.format, spec.data.split, spec.data.name)
    if spec.data.format == "qvhighlights":
        return _score_qvhighlights(spec, predictions_path, read_predictions(predictions_path, QVH_FORMAT), gts, started)
    rows, other = _this_benchmark(spec, read_predictions(predictions_path, ROW_FORMAT))
    video_col, span_col = spec.video.column, spec.answer.column
    by_key: dict[tuple, list[int]] = {}
    by_prompt: dict[tuple, list[int]] = {}  # older samples.jsonl files: `query` held the spec's prompt column
    for i, g in enumerate(gts):
        if not isinstance(g, dict):
            raise UserError(f"{path}: annotation {i + 1} is not a JSON object ({_describe(g)})")
        query = query_of(spec, g)
        for column, value in ((video_col, g.get(video_col)), (span_col, g.get(span_col)), ("query", query)):
            if value is None:
                raise UserError(f"{path}: annotation {i + 1} has no `{column}` (columns: {', '.join(map(str, g))})")
        by_key.setdefault((str(g[video_col]), str(query).strip()), []).append(i)
        if spec.prompt.column != "query" and g.get(spec.prompt.column) is not None:
            by_prompt.setdefault((str(g[video_col]), str(g[spec.prompt.column]).strip()), []).append(i)

    given: dict[int, object] = {}
    lines: dict[int, int] = {}
    unmatched: list[int] = []
    for number, p in rows:
        where = f"{predictions_path}:{number}"
        field = "prediction" if "prediction" in p or "completion" not in p else "completion"
        absent = [k for k in ("video", "query", "prediction") if (field if k == "prediction" else k) not in p]
        if absent:
            raise UserError(f"{where}: no `{'`, `'.join(absent)}`; each row needs {ROW_FORMAT}")
        video, query = p["video"], p["query"]
        if isinstance(video, bool) or not isinstance(video, (str, int)):
            raise UserError(f"{where}: `video` must be the annotation's video id (a string), got {_describe(video)}")
        if not isinstance(query, str):
            raise UserError(f"{where}: `query` must be the query text (a string), got {_describe(query)}")
        key = (str(video), query.strip())
        index = _first_free(by_key.get(key), given)
        if index is None:
            index = _first_free(by_prompt.get(key), given)
        if index is None:
            unmatched.append(number)
            continue
        given[index], lines[index] = p[field], number
    if not given:
        first = rows[0][1]
        g = gts[0] if gts else {}
        raise UserError(f"{predictions_path}: no row matches an annotation of `{path}` by (video, query): line "
                        f"{rows[0][0]} has video {first['video']!r}, query {first['query']!r}; the first annotation "
                        f"has video {g.get(video_col)!r}, query {query_of(spec, g) if g else None!r}")

    total = min(spec.limit or len(gts), len(gts))  # every annotation: a missing prediction is IoU 0
    indices = list(range(total))
    golds = [gts[i][span_col] for i in indices]
    predicted = [given.get(i) for i in indices]
    ious = grounding.span_ious(predicted, golds)
    values = grounding.grounding_metrics(ious, tuple(spec.metrics.thresholds))
    samples = [{"benchmark": spec.name, "video": gts[i][video_col], "query": query_of(spec, gts[i]),
                "span": jsonable(gts[i][span_col]), "prediction": jsonable(pred), "parsed": parsed_span(pred), "iou": iou}
               for i, pred, iou in zip(indices, predicted, ious)]
    covered = sum(i in given for i in indices)
    unparsable = [lines[i] for i in indices if i in given and grounding.finite_span(given[i]) is None]
    bad = [i for i in indices if grounding.finite_span(gts[i][span_col]) is None]
    info = {"score_s": time.perf_counter() - started, "queries": total, "predicted": covered,
            "missing_predictions": total - covered, "unparsable_predictions": len(unparsable),
            "unmatched_predictions": len(unmatched), "other_benchmark_rows": other, "bad_annotations": len(bad)}
    warnings = []
    if covered < total:
        warnings.append(f"{spec.name}: `{predictions_path}` predicts {covered} of {total} queries "
                        f"({100 * covered / total:.1f} %); the {total - covered} without a prediction count as IoU 0 "
                        f"(R1@θ and mIoU are over all {total} queries)")
    if unparsable:
        warnings.append(f"{spec.name}: {len(unparsable)} predictions name no finite span and count as IoU 0 "
                        f"(lines {_lines(unparsable)})")
    if unmatched:
        warnings.append(f"{spec.name}: {len(unmatched)} rows of `{predictions_path}` match no annotation of `{path}` "
                        f"by (video, query), or repeat a query, and were ignored (lines {_lines(unmatched)})")
    if other:
        warnings.append(f"{spec.name}: {other} rows of other benchmarks in `{predictions_path}` were ignored")
    if bad:
        warnings.append(f"{spec.name}: {len(bad)} annotations of `{path}` have no finite span and count as IoU 0 "
                        f"(first: video {gts[bad[0]][video_col]!r}, query {query_of(spec, gts[bad[0]])!r})")
    return BenchResult(spec.name, values, samples, info, spec, warnings)


def _numbers(value, where: str, field: str, width: int | None = None) -> list:
    """`value` checked to be a non-empty list of finite numbers (`width` of them when given)."""
    ok = (isinstance(value, list) and value and (width is None or len(value) >= width)
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok:
        shape = "[start, end, score] windows of finite numbers" if width else "a non-empty list of finite numbers"
        got = json.dumps(value)[:80] if isinstance(value, list) else _describe(value)
        raise UserError(f"{where}: `{field}` must be {shape}, got {got}")
    return value


def _score_qvhighlights(spec: BenchmarkSpec, predictions_path: str, rows: list[tuple[int, dict]], gts: list[dict],
                        started: float) -> BenchResult:
    """`score_predictions` for QVHighlights (see its docstring)."""
    rows, other = _this_benchmark(spec, rows)
    known = {g["qid"] for g in gts}
    preds, lines, unmatched = [], [], []
    seen = set()
    for number, p in rows:
        where = f"{predictions_path}:{number}"
        if "qid" not in p:
            raise UserError(f"{where}: no `qid`; expected {QVH_FORMAT}")
        qid = p["qid"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise UserError(f"{where}: `qid` must be the query id (an integer), got {_describe(qid)}")
        row: dict = {"qid": qid}
        if "pred_relevant_windows" in p:
            windows = p["pred_relevant_windows"]
            if not isinstance(windows, list) or not windows:
                got = _describe(windows) if not isinstance(windows, list) else "an empty list"
                raise UserError(f"{where}: `pred_relevant_windows` must be a non-empty list of [start, end, score] "
                                f"windows, got {got}")
            row["pred_relevant_windows"] = [_numbers(w, where, "pred_relevant_windows", 3) for w in windows]
        if "pred_saliency_scores" in p:
            row["pred_saliency_scores"] = _numbers(p["pred_saliency_scores"], where, "pred_saliency_scores")
        if len(row) == 1:
            field = "prediction" if "prediction" in p else "completion" if "completion" in p else None
            if field is None:
                raise UserError(f"{where}: no `pred_relevant_windows`, `pred_saliency_scores` or `prediction`; "
                                f"expected {QVH_FORMAT}")
            row["pred_relevant_windows"] = [[*(grounding.finite_span(p[field]) or (0.0, 0.0)), 1.0]]
        if qid not in known or qid in seen:
            unmatched.append(number)
            continue
        seen.add(qid)
        preds.append(row)
        lines.append(number)
    if not preds:
        raise UserError(f"{predictions_path}: no row's `qid` is a query of the annotations (first: line {rows[0][0]}, "
                        f"qid {rows[0][1]['qid']!r})")
    for key in ("pred_relevant_windows", "pred_saliency_scores"):
        has = [key in r for r in preds]
        if any(has) and not all(has):
            raise UserError(f"{predictions_path}:{lines[has.index(False)]}: no `{key}`, which line "
                            f"{lines[has.index(True)]} has: every row needs the same fields")
    values = grounding.qvhighlights_metrics(preds, gts)
    total = len(known)
    info = {"score_s": time.perf_counter() - started, "queries": len(preds), "annotations": total,
            "missing_predictions": total - len(preds), "unmatched_predictions": len(unmatched),
            "other_benchmark_rows": other}
    warnings = []
    if len(preds) < total:
        warnings.append(f"{spec.name}: `{predictions_path}` predicts {len(preds)} of {total} annotated queries "
                        f"({100 * len(preds) / total:.1f} %); the QVHighlights metrics average over the predicted "
                        f"queries only (as the official evaluation without its match check), missing ones do not "
                        f"count as 0")
    if unmatched:
        warnings.append(f"{spec.name}: {len(unmatched)} rows of `{predictions_path}` have a `qid` that is not "
                        f"annotated or repeats one, and were ignored (lines {_lines(unmatched)})")
    if other:
        warnings.append(f"{spec.name}: {other} rows of other benchmarks in `{predictions_path}` were ignored")
    return BenchResult(spec.name, values, [], info, spec, warnings)
