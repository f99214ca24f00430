"""Run benchmarks: a model through the rollout engine, graded by the training verifiers (the `Scorer`).

    evaluator = Evaluator([load_spec("gsm8k", {"sampling": {"n": 4}})])
    results = evaluator.run(engine, tokenizer)           # {name: BenchResult}
    evaluator.close()

Every sample is graded by the spec's verifier in the Scorer's worker processes with its timeout, exactly as an
RL reward is, so "correct" means the same in training and evaluation, and no answer can hang the run. A sample
is correct when its score is ≥ `metrics.correct_at` (1.0: the built-in verifiers give 1.0 for right answers).
Grounding benchmarks run a vision-language model on each (video, query) (`_run_grounding`: the videos come from
the spec's `video.dir`, `--videos DIR`: the folder holding the files or the one above it, see `find_video_dir`),
or score a predictions file (`score_predictions`); both report the same metric names, and a grounding run's
`samples.jsonl` is itself a predictions file (its `video`, `query` and `prediction` fields). A query whose video is
missing or cannot be decoded is reported once and left out (counted in `info["skipped_videos"]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluation import grounding, metrics
from posttrain.data import load_benchmark_rows
from posttrain.recipe.benchmark import BenchmarkSpec, data_path, render_template

PROMPTS_PER_CALL = 32  # prompts per engine call: the progress bar's granularity


@dataclasses.dataclass
class BenchResult:
    name: str
    metrics: dict[str, float]
    samples: list[dict]  # one record per problem (prompt, reference, completions, answers, scores)
    info: dict[str, float]  # timings and counts (not metrics)
    spec: BenchmarkSpec
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the console (the CLI prints them)


def render(spec: BenchmarkSpec, row: dict, tokenizer) -> str:
    """The text the model sees for one row: the filled template, in the chat template when `prompt.chat`."""
    from posttrain.data import render_prompt

    text = render_template(spec.prompt.template, row)
    chat = spec.prompt.chat and getattr(tokenizer, "chat_template", None) is not None  # base models have none
    return render_prompt(tokenizer, text, "chat" if chat else "plain", spec.prompt.system)


def sampling_params(spec: BenchmarkSpec, seed_offset: int = 0):
    from posttrain.rollout.base import SamplingParams

    s = spec.sampling
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                          stop=tuple(s.stop), seed=s.seed + seed_offset, logprobs=False)


def answer_of(completion: str) -> str | None:
    """The final answer a sample votes with: what the verifiers extract, else the whole text."""
    from posttrain.rewards.extract import extract_answer

    found = extract_answer(completion)
    return found if found is not None else (completion.strip() or None)


class Evaluator:
    """Benchmarks with their rows loaded once; `run` evaluates a model (through an engine) on all of them."""

    def __init__(self, specs: list[BenchmarkSpec], data: dict[str, str] | None = None, workers: int = 2,
                 progress: bool = True):
        from posttrain.reward import Scorer

        self.specs, self.progress = list(specs), progress
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise UserError(f"benchmark names must be unique, got {', '.join(names)}")
        self.rows = {}
        for spec in self.specs:
            path = data_path(spec, (data or {}).get(spec.name))
            rows = load_benchmark_rows(path, spec.data.format, spec.data.split, spec.data.name, spec.limit)
            if not rows:
                raise UserError(f"benchmark `{spec.name}`: no rows in `{path}`")
            needed = (spec.prompt.column, spec.answer.column) + ((spec.video.column,) if spec.task == "grounding" else ())
            for column in needed:
                if column not in rows[0]:
                    raise UserError(f"benchmark `{spec.name}` ({spec.source}): `{path}` has no column `{column}` "
                                    f"(columns: {', '.join(rows[0])})")
            self.rows[spec.name] = rows
        # grounding: find the videos now, before a model is loaded
        self.video_dirs = {s.name: find_video_dir(s, self.rows[s.name]) for s in self.specs if s.task == "grounding"}
        self.scorers = {s.name: Scorer([s.verifier], workers=workers) for s in self.specs if s.task == "math"}

    def run(self, engine, tokenizer, desc: str = "eval") -> dict[str, BenchResult]:
        return {spec.name: (self._run_grounding if spec.task == "grounding" else self._run_one)(spec, engine, tokenizer, desc)
                for spec in self.specs}

    def _run_grounding(self, spec: BenchmarkSpec, engine, tokenizer, desc: str) -> BenchResult:
        """Greedy (or sampled) answers of a vision-language model on every (video, query); R1@θ and mIoU of the
        first sample's span (QVHighlights: its moment-retrieval metrics with that span as the one window)."""
        from tqdm.auto import tqdm

        from posttrain.recipe.benchmark import render_template
        from posttrain.video import VideoError, video_prompts

        rows = self.rows[spec.name]
        chat = spec.prompt.chat and getattr(tokenizer, "chat_template", None) is not None
        video = spec.video.model_copy(update={"dir": self.video_dirs[spec.name]})
        prompts = video_prompts(tokenizer, _model_path(engine), rows, video,
                                lambda row: render_template(spec.prompt.template, row), "chat" if chat else "plain",
                                spec.prompt.system, f"benchmark `{spec.name}`")
        started, outputs, kept = time.perf_counter(), [], []
        with tqdm(total=len(prompts), desc=f"{desc} {spec.name}", unit="query", disable=not self.progress,
                  dynamic_ncols=True, leave=False) as bar:
            for call, start in enumerate(range(0, len(prompts), PROMPTS_PER_CALL)):
                batch, engine_prompts = [], []
                for i in range(start, min(start + PROMPTS_PER_CALL, len(prompts))):
                    try:
                        engine_prompts.append(prompts.get(i))
                        batch.append(i)
                    except VideoError:
                        pass  # reported once by the cache; counted below
                if engine_prompts:
                    outputs += engine.generate(engine_prompts, sampling_params(spec, call))
                    kept += batch
                bar.update(min(PROMPTS_PER_CALL, len(prompts) - start))
        generated = time.perf_counter() - started
        golds = [prompts.rows[i][spec.answer.column] for i in kept]
        texts = [group[0].text for group in outputs]
        ious = grounding.span_ious(texts, golds)
        if spec.data.format == "qvhighlights":
            preds = [{"qid": prompts.rows[i]["qid"],
                      "pred_relevant_windows": [[*(grounding.finite_span(t) or (0.0, 0.0)), 1.0]]}
                     for i, t in zip(kept, texts)]
            values = grounding.qvhighlights_metrics(preds, [prompts.rows[i] for i in kept])
        else:
            values = grounding.grounding_metrics(ious, tuple(spec.metrics.thresholds))
        # `video`, `query` (the annotation's, not the rendered prompt) and `prediction` make each line a row of a
        # predictions file: `posttrain eval --predictions samples.jsonl` scores it again to the same metrics
        samples = [{"benchmark": spec.name, **_qid(prompts.rows[i]), "video": prompts.name(i),
                    "query": query_of(spec, prompts.rows[i]), "span": _jsonable(gold), "prediction": text,
                    "completion": text, "parsed": _parsed(text), "iou": iou, "completions": [c.text for c in group]}
                   for i, gold, text, iou, group in zip(kept, golds, texts, ious, outputs)]
        tokens = sum(len(c.token_ids) for group in outputs for c in group)
        info = {"problems": len(kept), "queries": len(kept), "generate_s": generated, "tokens": tokens,
                "tokens_per_s": tokens / max(generated, 1e-9),
                "skipped_videos": len(rows) - len(kept)}
        return BenchResult(spec.name, values, samples, info, spec)

    def _run_one(self, spec: BenchmarkSpec, engine, tokenizer, desc: str) -> BenchResult:
        from tqdm.auto import tqdm

        rows = self.rows[spec.name]
        prompts = [render(spec, row, tokenizer) for row in rows]
        n = spec.sampling.n
        started = time.perf_counter()
        outputs = []
        with tqdm(total=len(rows) * n, desc=f"{desc} {spec.name}", unit="sample", disable=not self.progress,
                  dynamic_ncols=True, leave=False) as bar:
            for call, start in enumerate(range(0, len(prompts), PROMPTS_PER_CALL)):
                chunk = prompts[start : start + PROMPTS_PER_CALL]
                outputs += engine.generate(chunk, sampling_params(spec, call))
                bar.update(len(chunk) * n)
        generated = time.perf_counter() - started

        started = time.perf_counter()
        flat = [(i, c) for i, group in enumerate(outputs) for c in group]
        columns = {k: [rows[i].get(k) for i, _ in flat] for k in rows[0]}
        columns["answer"] = [rows[i][spec.answer.column] for i, _ in flat]
        result = self.scorers[spec.name].score([prompts[i] for i, _ in flat], [c.text for _, c in flat],
                                               [c.token_ids for _, c in flat], columns)
        scored = time.perf_counter() - started
        scores = result.per_reward[spec.verifier.key]

        samples, per_problem = [], []
        for i, group in enumerate(outputs):
            texts = [c.text for c in group]
            row_scores = scores[i * n : (i + 1) * n]
            correct = [s is not None and s >= spec.metrics.correct_at for s in row_scores]
            answers = [answer_of(t) for t in texts]
            per_problem.append(metrics.problem_metrics(answers, correct, spec.metrics.k))
            samples.append({"benchmark": spec.name, "index": i, "prompt": prompts[i],
                            "reference": _jsonable(rows[i][spec.answer.column]), "completions": texts,
                            "answers": answers, "scores": row_scores, "correct": correct,
                            "finish_reasons": [c.finish_reason for c in group]})
        tokens = sum(len(c.token_ids) for _, c in flat)
        info = {"problems": len(rows), "samples": len(flat), "generate_s": generated, "score_s": scored, "tokens": tokens,
                  "tokens_per_s": tokens / max(generated, 1e-9),
                  "verifier_failures": result.failures[spec.verifier.key],
                  "verifier_timeouts": result.timeouts[spec.verifier.key]}
        return BenchResult(spec.name, metrics.benchmark_metrics(per_problem), samples, info, spec)

    def close(self) -> None:
        for scorer in self.scorers.values():
            scorer.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _model_path(engine) -> str:
    """Where the engine's model was loaded from (its vision preprocessing settings live there)."""
    path = getattr(engine, "path", None)
    if path is None:
        config = getattr(getattr(engine, "model", None), "config", None)
        path = getattr(config, "_name_or_path", None)
    if not path:
        raise UserError("video evaluation needs the model's directory (its preprocessor_config.json)")
    return str(path)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _qid(row: dict) -> dict:
    """`{"qid": ...}` for a QVHighlights row (its predictions are matched by qid), else nothing."""
    return {"qid": row["qid"]} if "qid" in row else {}


def query_of(spec: BenchmarkSpec, row: dict):
    """The query of an annotation row: its `query` column, else the spec's prompt column."""
    return row["query"] if "query" in row else row.get(spec.prompt.column)


# --------------------------------------------------------------------------------------------- videos

VIDEO_PROBE = 64  # rows whose videos decide between the candidate folders


def find_video_dir(spec: BenchmarkSpec, rows: list[dict]) -> str | None:
    """The folder of the rows' videos: the spec's `video.dir` (`--videos DIR`), its `videos/` subfolder or its
    parent, whichever holds the most of the first rows' videos (ties: in that order). So `--videos` may name the
    folder holding the files or the folder above it: the synthetic task's rows say `videos/test_00000.mp4`,
    Charades-STA's `AO8RW`. No folder holding any video of the benchmark is a UserError naming every folder
    tried; individual missing videos are left to `video_prompts` (skipped and counted)."""
    from posttrain.recipe.benchmark import video_dir
    from posttrain.video import VIDEO_EXTENSIONS, VideoError, resolve

    given = video_dir(spec)
    names = [str(r[spec.video.column]) for r in rows if isinstance(r, dict) and r.get(spec.video.column) is not None]
    candidates = [given] if given is None else list(dict.fromkeys([given, str(Path(given) / "videos"),
                                                                   str(Path(given).parent)]))

    def found(folder, name) -> bool:
        try:
            resolve(folder, name)
            return True
        except (VideoError, OSError, ValueError):
            return False

    counts = [sum(found(c, n) for n in names[:VIDEO_PROBE]) for c in candidates]
    if not any(counts):  # the first rows' videos are all missing: any video of the benchmark decides
        counts = [int(any(found(c, n) for n in names[VIDEO_PROBE:])) for c in candidates]
    if not any(counts):
        first = names[0] if names else "(none)"
        if given is None:
            raise UserError(f"benchmark `{spec.name}`: video `{first}` not found (relative paths are read from "
                            f"{Path.cwd()}) and no video folder is given: pass --videos DIR (the folder holding the "
                            f"video files, or the folder above it)")
        tried = ", ".join(f"`{c}`" for c in candidates)
        raise UserError(f"benchmark `{spec.name}`: no video of the benchmark found: `{first}` is in none of {tried} "
                        f"(a name without extension is tried with {', '.join(VIDEO_EXTENSIONS)}); --videos DIR must "
                        f"be the folder holding the video files or the folder above it")
    best = candidates[counts.index(max(counts))]
    if best != given:
        print(f"[posttrain] {spec.name}: reading videos from `{best}` (the video names of the annotations are "
              f"relative to it, not to `{given}`)")
    return best


# ---------------------------------------------------------------------------------------- predictions

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
                "span": _jsonable(gts[i][span_col]), "prediction": _jsonable(pred), "parsed": _parsed(pred), "iou": iou}
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


def _parsed(prediction):
    span = grounding.finite_span(prediction)
    return None if span is None else list(span)
