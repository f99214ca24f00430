"""Benchmark specs: one YAML file per benchmark in `eval/` (or anywhere, by path). No Python per benchmark.

A spec says where the data is, how a row becomes a prompt, which column is the reference, which verifier
grades (the same registry as training rewards), the default sampling and which k to report:

    name: gsm8k
    task: math                    # math (pass@k / maj@k / avg@k) | grounding (R1@IoU, mIoU; QVHighlights mAP)
    data:
      path: data/gsm8k/test.jsonl # relative paths: to the repository root for shipped sets; null = the user
      format: auto                # must give `--data` (non-commercial sets); auto | charades | activitynet | qvhighlights
      split: test                 # for hub ids and saved datasets
      note: "MIT (c) OpenAI"      # licence / where to get it: printed when the path is missing
    prompt:
      column: question            # the row's question ...
      template: "{question}\\nPut your final answer within \\\\boxed{}."   # ... put into a template
      chat: true                  # apply the tokenizer's chat template (false: the raw text)
      system: null
    answer: {column: answer}      # handed to the verifier as its `answer` column
    verifier: {name: math}        # any reward spec: built-in, registered, module:function, with kwargs/timeout
    sampling: {n: 1, temperature: 0.0, top_p: 1.0, max_tokens: 2048}
    metrics: {k: [1]}

Templates fill `{column}` (or `{column:.1f}`) with the row's value when the row has that column; every other
brace is left alone, so LaTeX such as `\\boxed{}` needs no escaping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from posttrain.errors import UserError, did_you_mean
from posttrain.recipe.schema import Strict, VideoSpec
from posttrain.recipe.scoring import RewardSpec
from posttrain.recipe.yamlfile import deep_merge, read_yaml, validation_errors

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = REPO_ROOT / "eval"
Format = Literal["auto", "charades", "activitynet", "qvhighlights"]


class DataSource(Strict):
    path: str | None = None
    format: Format = "auto"
    split: str = "test"
    name: str | None = None  # hub dataset config
    note: str | None = None


class PromptSpec(Strict):
    column: str = "question"
    template: str = "{question}"
    chat: bool = True
    system: str | None = None


class AnswerSpec(Strict):
    column: str = "answer"


class SamplingSpec(Strict):
    n: int = Field(1, gt=0)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(1024, gt=0)
    stop: list[str] = []
    seed: int = 0


class MetricSpec(Strict):
    k: list[int] = [1]
    correct_at: float = 1.0  # math: a sample is correct when its verifier score is >= this
    thresholds: list[float] = [0.3, 0.5, 0.7]  # grounding: R1@θ


class BenchmarkSpec(Strict):
    name: str
    task: Literal["math", "grounding"] = "math"
    data: DataSource = DataSource()
    prompt: PromptSpec = PromptSpec()
    answer: AnswerSpec = AnswerSpec()
    verifier: RewardSpec = RewardSpec(name="math")
    sampling: SamplingSpec = SamplingSpec()
    metrics: MetricSpec = MetricSpec()
    video: VideoSpec = VideoSpec()  # grounding: the video column, directory (`--videos DIR`) and frame sampling
    limit: int | None = Field(None, gt=0)  # the first `limit` rows only (smoke runs)
    source: str | None = None  # the spec file it came from (set by the loader)

    @model_validator(mode="after")
    def _ks_fit(self):
        bad = [k for k in self.metrics.k if not 1 <= k <= self.sampling.n]
        if bad:
            raise ValueError(f"metrics.k {bad} must lie in 1..sampling.n ({self.sampling.n}); "
                             f"raise sampling.n (--n) or lower k (--k)")
        return self


_FIELD = re.compile(r"\{(\w+)(:[^{}]*)?\}")


def render_template(template: str, row: dict) -> str:
    """Fill `{column}` / `{column:fmt}` from `row`; braces naming no column of the row are kept as they are."""
    def fill(match: re.Match) -> str:
        name, fmt = match.group(1), match.group(2)
        if name not in row:
            return match.group(0)
        return format(row[name], fmt[1:]) if fmt else str(row[name])

    return _FIELD.sub(fill, template)


def available_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def spec_path(name_or_path: str) -> Path:
    """`gsm8k` → eval/gsm8k.yaml; a path to a .yaml file as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"benchmark spec `{name_or_path}` not found")
        return path
    path = SPEC_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"unknown benchmark `{name_or_path}`{did_you_mean(name_or_path, available_specs())}; "
                        f"or give the path of a spec .yaml file (see eval/README.md)")
    return path


def load_spec(name_or_path: str, overrides: dict | None = None) -> BenchmarkSpec:
    """Read a spec file, deep-merge `overrides` (e.g. {"sampling": {"n": 16}}) and validate it strictly;
    errors name the file, line and key."""
    path = spec_path(name_or_path)
    data, where = read_yaml(path)
    data = deep_merge(data, overrides or {})
    data.setdefault("source", str(path))
    try:
        return BenchmarkSpec(**data)
    except ValidationError as exc:
        raise UserError("\n".join(validation_errors(exc, BenchmarkSpec, (), where, str(path)))) from None


def inline_spec(data: dict, where: str) -> BenchmarkSpec:
    """A spec given inline (a recipe's `eval.benchmarks[i].spec` without `bench`)."""
    try:
        return BenchmarkSpec(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def data_path(spec: BenchmarkSpec, given: str | None = None, how: str | None = None) -> str:
    """Where to read the benchmark's rows: the user's path, else the spec's (relative to the repo root when
    it names a shipped file). A spec without data and no path given is an error that says where to get it."""
    if given:
        return given
    if spec.data.path is None:
        note = f" ({spec.data.note})" if spec.data.note else ""
        how = how or f"`--data {spec.name}=PATH`"
        raise UserError(f"benchmark `{spec.name}` ships no data{note}: give its file with {how}")
    shipped = REPO_ROOT / spec.data.path
    return str(shipped) if not Path(spec.data.path).is_absolute() and shipped.exists() else spec.data.path


def video_dir(spec: BenchmarkSpec) -> str | None:
    """The spec's video directory, relative to the repository root when it names a folder there."""
    given = spec.video.dir
    if given is None or Path(given).is_absolute():
        return given
    shipped = REPO_ROOT / given
    return str(shipped) if shipped.is_dir() and not Path(given).is_dir() else given


def recipe_benchmarks(eval_spec, source: str = "recipe") -> tuple[list[BenchmarkSpec], dict[str, str]]:
    """The specs a recipe's `eval:` block asks for (`EvalBenchmark` overrides applied) and their data paths."""
    specs, data = [], {}
    for i, entry in enumerate(eval_spec.benchmarks):
        sampling = {k: v for k, v in {"n": entry.n, "temperature": entry.temperature, "top_p": entry.top_p,
                                      "max_tokens": entry.max_tokens}.items() if v is not None}
        extra: dict = {"sampling": sampling} if sampling else {}
        if entry.k is not None:
            extra["metrics"] = {"k": entry.k}
        if entry.limit is not None:
            extra["limit"] = entry.limit
        overrides = deep_merge(entry.spec, extra)
        where = f"{source}: eval.benchmarks.{i}"
        try:
            spec = load_spec(entry.bench, overrides) if entry.bench else inline_spec(overrides, where + ".spec")
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        specs.append(spec)
        if entry.data:
            data[spec.name] = entry.data
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: eval.benchmarks: names must be unique, got {', '.join(names)} "
                        f"(set spec.name to tell two apart)")
    return specs, data
