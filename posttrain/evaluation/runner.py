"""Run benchmarks: a model through the rollout engine, graded by the training verifiers (the `Scorer`).

    evaluator = Evaluator([load_spec("gsm8k", {"sampling": {"n": 4}})])
    results = evaluator.run(engine, tokenizer)           # {name: BenchResult}
    evaluator.close()

Every sample is graded by the spec's verifier in the Scorer's worker processes with its timeout, exactly as an
RL reward is, so "correct" means the same in training and evaluation, and no answer can hang the run. A sample
is correct when its score is ≥ `metrics.correct_at` (1.0: the built-in verifiers give 1.0 for right answers).
Grounding benchmarks run a vision-language model on each (video, query) (`_run_grounding`: the videos come from
the spec's `video.dir`, `--videos DIR`: the folder holding the files or the one above it, see `find_video_dir`),
or score a predictions file (`predictions.score_predictions`); both report the same metric names, and a grounding run's
`samples.jsonl` is itself a predictions file (its `video`, `query` and `prediction` fields). A query whose video is
missing or cannot be decoded is reported once and left out (counted in `info["skipped_videos"]`).
"""

from __future__ import annotations

import dataclasses
import json
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
                    "query": query_of(spec, prompts.rows[i]), "span": jsonable(gold), "prediction": text,
                    "completion": text, "parsed": parsed_span(text), "iou": iou, "completions": [c.text for c in group]}
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
                            "reference": jsonable(rows[i][spec.answer.column]), "completions": texts,
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


def jsonable(value):
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


def parsed_span(prediction):
    """The finite [start, end] a prediction names, as a list, else None (samples and predictions files)."""
    span = grounding.finite_span(prediction)
    return None if span is None else list(span)
