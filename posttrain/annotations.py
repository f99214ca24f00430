"""Annotation and benchmark files read as plain rows (no `datasets`: their columns mix types).

    read_jsonl    one dict per line; a bad line is an error naming the file and line
    charades      Charades-STA annotations, one query per line: `<video> <start> <end>##<sentence>`
    activitynet   ActivityNet Captions: {video: {duration, timestamps: [[s, e], ...], sentences: [...]}}
    qvhighlights  QVHighlights jsonl: {qid, query, vid, duration, relevant_windows, relevant_clip_ids, ...}

Grounding rows all get `video`, `query`, `span` ([start, end] s, the first relevant window for QVHighlights)
and `duration` (None when the annotation has none: Charades-STA lists no durations). `data.load_benchmark_rows`
picks the reader by format.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import UserError

GROUNDING_FORMATS = ("charades", "activitynet", "qvhighlights")


def read_jsonl(path: str) -> list[dict]:
    """One dict per non-empty line; a bad line is an error naming the file and line. Plain jsonl reading: benchmark files mix types within a column (e.g. OlympiadBench `unit` null or str,
    AMC `answer` floats), which Arrow's schema inference rejects or coerces."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not a JSON object: {err.msg}") from None
    return rows


def charades_rows(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise UserError(f"{path}:{number}: expected `<video> <start> <end>##<sentence>`, got {line[:80]!r}")
        try:
            span = [float(parts[1]), float(parts[2])]
        except ValueError:
            raise UserError(f"{path}:{number}: start/end must be numbers, got {parts[1]!r} {parts[2]!r}") from None
        rows.append({"video": parts[0], "query": sentence.strip(), "span": span, "duration": None})
    return rows


def activitynet_rows(path: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    rows = []
    for video, item in data.items():
        for span, sentence in zip(item["timestamps"], item["sentences"]):
            rows.append({"video": video, "query": sentence.strip(), "span": [float(span[0]), float(span[1])],
                         "duration": float(item["duration"])})
    return rows


def qvhighlights_rows(path: str) -> list[dict]:
    rows = []
    for row in read_jsonl(path):
        windows = row.get("relevant_windows") or [[0.0, 0.0]]
        rows.append({**row, "video": row["vid"], "span": [float(windows[0][0]), float(windows[0][1])]})
    return rows


def grounding_rows(path: str, fmt: str) -> list[dict]:
    """The rows of a grounding annotation file in format `fmt` (one of `GROUNDING_FORMATS`)."""
    readers = {"charades": charades_rows, "activitynet": activitynet_rows, "qvhighlights": qvhighlights_rows}
    if not Path(path).is_file():
        raise UserError(f"{fmt} annotations `{path}` not found (relative paths are read from {Path.cwd()})")
    return readers[fmt](path)
