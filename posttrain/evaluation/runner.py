"""Run benchmarks: a model through the rollout engine, graded by the training verifiers (the `Scorer`).

    evaluator = Evaluator([load_spec("gsm8k", {"sampling": {"n": 4}})])
    results = evaluator.run(engine, tokenizer)           # {name: BenchResult}
    evaluator.close()

Every sample is graded by the spec's verifier in the Scorer's worker processes with its timeout, exactly as an
RL reward is, so "correct" means the same in training and evaluation, and no answer can hang the run. A sample
is correct when its score is ≥ `metrics.correct_at` (1.0: the built-in verifiers give 1.0 for right answers).
Grounding benchmarks run a vision-language model on each (video, query) (`_run_grounding`: the videos come from
the spec's `video.dir`, `--videos DIR`), or score a predictions file (`score_predictions`); both report the same
metric names. A query whose video is missing or cannot be decoded is reported once and left out (counted in
`info["skipped_videos"]`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluation import grounding, metrics
from posttrain.annotations import read_jsonl
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
        self.scorers = {s.name: Scorer([s.verifier], workers=workers) for s in self.specs if s.task == "math"}

    def run(self, engine, tokenizer, desc: str = "eval") -> dict[str, BenchResult]:
        return {spec.name: (self._run_grounding if spec.task == "grounding" else self._run_one)(spec, engine, tokenizer, desc)
                for spec in self.specs}

    def _run_grounding(self, spec: BenchmarkSpec, engine, tokenizer, desc: str) -> BenchResult:
        """Greedy (or sampled) answers of a vision-language model on every (video, query); R1@θ and mIoU of the
        first sample's span (QVHighlights: its moment-retrieval metrics with that span as the one window)."""
        from tqdm.auto import tqdm

        from posttrain.recipe.benchmark import render_template, video_dir
        from posttrain.rewards.temporal import parse_span
        from posttrain.video import VideoError, video_prompts

        rows = self.rows[spec.name]
        chat = spec.prompt.chat and getattr(tokenizer, "chat_template", None) is not None
        video = spec.video.model_copy(update={"dir": video_dir(spec)})
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
            preds = [{"qid": prompts.rows[i]["qid"], "pred_relevant_windows": [[*(parse_span(t) or (0.0, 0.0)), 1.0]]}
                     for i, t in zip(kept, texts)]
            values = grounding.qvhighlights_metrics(preds, [prompts.rows[i] for i in kept])
        else:
            values = grounding.grounding_metrics(ious, tuple(spec.metrics.thresholds))
        samples = [{"benchmark": spec.name, "video": prompts.name(i), "query": prompts.rows[i].get(spec.prompt.column),
                    "span": _jsonable(gold), "completion": text, "parsed": _parsed(text), "iou": iou,
                    "completions": [c.text for c in group]}
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


# ---------------------------------------------------------------------------------------- predictions


def _read_predictions(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise UserError(f"predictions file `{path}` not found")
    return read_jsonl(path)


def score_predictions(spec: BenchmarkSpec, predictions_path: str, data: str | None = None) -> BenchResult:
    """Grounding metrics of a predictions file against the benchmark's annotations (see module doc of
    `posttrain.evaluation.grounding` for the metrics and `cli.py` for the file formats)."""
    started = time.perf_counter()
    path = data_path(spec, data)
    gts = load_benchmark_rows(path, spec.data.format, spec.data.split, spec.data.name)
    preds = _read_predictions(predictions_path)
    if spec.data.format == "qvhighlights":
        missing = [p for p in preds if "qid" not in p]
        if missing:
            raise UserError(f"{predictions_path}: QVHighlights predictions need `qid`, "
                            f"`pred_relevant_windows` and/or `pred_saliency_scores` (the official submission format)")
        known = {g["qid"] for g in gts}
        values = grounding.qvhighlights_metrics(preds, gts)
        info = {"score_s": time.perf_counter() - started, "queries": sum(p["qid"] in known for p in preds),
                "annotations": len(gts)}
        return BenchResult(spec.name, values, [], info, spec)

    by_key: dict[tuple, list[int]] = {}
    for i, g in enumerate(gts):
        by_key.setdefault((g["video"], g["query"]), []).append(i)
    given: dict[int, object] = {}
    for number, p in enumerate(preds, 1):
        if "video" not in p or "query" not in p or "prediction" not in p:
            raise UserError(f"{predictions_path}:{number}: each row needs `video`, `query` and `prediction` "
                            f"(model text or [start, end] seconds)")
        queue = by_key.get((p["video"], str(p["query"]).strip()))
        if queue:
            given[queue.pop(0)] = p["prediction"]
    if not given:
        raise UserError(f"{predictions_path}: no prediction matches an annotation of `{path}` by (video, query)")
    indices = list(range(min(spec.limit or len(gts), len(gts))))  # every annotation: a missing prediction is IoU 0
    golds = [gts[i]["span"] for i in indices]
    predicted = [given.get(i) for i in indices]
    ious = grounding.span_ious(predicted, golds)
    values = grounding.grounding_metrics(ious, tuple(spec.metrics.thresholds))
    samples = [{"benchmark": spec.name, "video": gts[i]["video"], "query": gts[i]["query"], "span": gts[i]["span"],
                "prediction": _jsonable(pred), "parsed": _parsed(pred), "iou": iou}
               for i, pred, iou in zip(indices, predicted, ious)]
    info = {"score_s": time.perf_counter() - started, "queries": len(indices),
            "missing_predictions": sum(i not in given for i in indices), "unmatched_predictions": len(preds) - len(given)}
    return BenchResult(spec.name, values, samples, info, spec)


def _parsed(prediction):
    from posttrain.rewards.temporal import parse_span

    span = parse_span(prediction)
    return None if span is None else list(span)
