"""Load a recipe: YAML (with line numbers) → one level of `base:` → dotted CLI overrides → strict schema.

Every problem becomes one `UserError` whose lines read `file:line: key.path: what is wrong`, so the user
can jump straight to it. Nothing here loads a model; `posttrain validate` is this module plus a batch
geometry check and finishes in seconds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from posttrain.errors import UserError, did_you_mean
from posttrain.recipe.kinds import stage_kinds
from posttrain.recipe.schema import Recipe, TrainArgs, geometry_problems, split_args, stage_args_model
from posttrain.recipe.yamlfile import Where, deep_merge, locate, read_yaml, validation_errors



@dataclasses.dataclass(frozen=True)
class Stage:
    """One validated stage: its name, kind, data spec, shared training args and algorithm args."""

    name: str
    kind: str
    spec: Any  # StageSpec
    train: TrainArgs
    algo: Any  # the algorithm's Args dataclass instance
    synthesizer: tuple | None = None  # ttcs stages: (RLArgs, grpo.Args) of the synthesizer policy


@dataclasses.dataclass(frozen=True)
class Resolved:
    recipe: Recipe
    stages: list[Stage]
    raw: dict  # the merged mapping after base + overrides: saved as recipe.resolved.yaml
    source: str
    where: dict = dataclasses.field(default_factory=dict)  # key path -> "file:line"

    def locate(self, *keys) -> str:
        return locate(self.where, tuple(keys), self.source)


# ---------------------------------------------------------------------------------------------- YAML


def _with_base(path: Path) -> tuple[dict, Where]:
    data, where = read_yaml(path)
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data, where
    base_path = (path.parent / str(base_ref)).resolve()
    base, base_where = read_yaml(base_path)
    if "base" in base:
        raise UserError(f"{base_where[('base',)]}: base: only one level of `base:` is allowed")
    return deep_merge(base, data), {**base_where, **where}


# ----------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`stages.sft.args.lr=3e-3` → (('stages','sft','args','lr'), 0.003). Values are parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override `{text}`: expected key.path=value, e.g. stages.sft.args.lr=3e-4")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override `{text}`: empty key in `{key}`")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return tuple(key.split(".")), _number_or(parsed)


def _number_or(value):
    """PyYAML reads `3e-3` as a string (YAML 1.1 wants `3.0e-3`); users mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _apply_overrides(data: dict, where: Where, overrides: list[str]) -> None:
    """Set each `key.path=value`; a number in the path indexes a list (`eval.benchmarks.0.limit=50`)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys):
            at = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise UserError(f"override `{text}`: `{at}`: the list has {len(node)} item(s), "
                                    f"index it with 0..{len(node) - 1}")
                key = int(key)
            elif not isinstance(node, dict):
                raise UserError(f"override `{text}`: `{'.'.join(keys[:depth])}` is not a mapping or a list")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
        where[tuple(int(k) if k.isdigit() else k for k in keys)] = f"override `{text}`"


# ---------------------------------------------------------------------------------------- validation


def _validate_stage(name: str, spec, recipe_where: Where, source: str) -> tuple[Stage | None, list[str]]:
    STAGE_KINDS = stage_kinds()
    kind = spec.kind or name
    if kind not in STAGE_KINDS:
        loc = ("stages", name, "kind") if spec.kind else ("stages", name)
        what = f"stage kind `{kind}` is unknown" + did_you_mean(kind, STAGE_KINDS)
        hint = "" if spec.kind else " (set `kind:` when the stage name is not its kind)"
        return None, [f"{locate(recipe_where, loc, source)}: stages.{name}: {what}{hint}"]
    algo_args, rl, judged = STAGE_KINDS[kind].args, STAGE_KINDS[kind].rl, STAGE_KINDS[kind].judge
    at = locate(recipe_where, ("stages", name), source)
    if judged and spec.judge is None:
        return None, [f"{at}: stages.{name}.judge: a `{kind}` stage needs a pairwise judge, e.g. "
                      f"`judge: {{kind: llm}}` or `judge: {{kind: rule, reward: {{name: exact}}}}`"]
    if not judged and spec.judge is not None:
        takes = ", ".join(f"`{k}`" for k, v in STAGE_KINDS.items() if v.judge)
        return None, [f"{locate(recipe_where, ('stages', name, 'judge'), source)}: stages.{name}.judge: "
                      f"a `{kind}` stage takes no judge (only {takes} stages do)"]
    kind_spec = STAGE_KINDS[kind]
    for key, wanted in (("privileged", kind_spec.privileged), ("synthesizer", kind_spec.synthesizer)):
        if wanted and getattr(spec, key) is None:
            example = "`privileged: {column: solution}`" if key == "privileged" else "`synthesizer: {args: {...}}`"
            return None, [f"{at}: stages.{name}.{key}: a `{kind}` stage needs `{key}:`, e.g. {example}"]
        if not wanted and getattr(spec, key) is not None:
            takes = ", ".join(f"`{k}`" for k, v in STAGE_KINDS.items() if getattr(v, key))
            return None, [f"{locate(recipe_where, ('stages', name, key), source)}: stages.{name}.{key}: "
                          f"a `{kind}` stage takes no `{key}` (only {takes} stages do)"]
    if kind_spec.synthesizer and spec.rewards:
        return None, [f"{locate(recipe_where, ('stages', name, 'rewards'), source)}: stages.{name}.rewards: a "
                      f"`{kind}` stage reads no rewards: its solver is rewarded by majority-vote pseudo-labels"]
    if rl and not judged and not kind_spec.synthesizer and not spec.rewards:  # a judged stage's rewards are optional: logged, not trained on
        return None, [f"{at}: stages.{name}.rewards: a `{kind}` stage needs at least one reward, e.g. "
                      f"`rewards: [{{name: math}}]`"]
    if not rl and spec.rewards:
        return None, [f"{locate(recipe_where, ('stages', name, 'rewards'), source)}: stages.{name}.rewards: "
                      f"a `{kind}` stage takes no rewards"]
    model = stage_args_model(kind, algo_args, rl)
    try:
        validated = model(**spec.args)
    except ValidationError as exc:
        return None, validation_errors(exc, model, ("stages", name, "args"), recipe_where, source)
    train, algo = split_args(validated, algo_args, rl)
    shaped = getattr(algo, "shaped_reward", None) if getattr(algo, "soft_advantage", False) else None
    if shaped is not None and shaped not in (keys := [r.key for r in spec.rewards]):
        return None, [f"{locate(recipe_where, ('stages', name, 'args', 'shaped_reward'), source)}: "
                      f"stages.{name}.args.shaped_reward: {shaped!r} is not one of the stage's rewards"
                      + did_you_mean(shaped, keys) + "; name the reward the soft advantage shapes"]
    if problem := async_problem(name, kind, kind_spec, spec.engine, train, algo):
        return None, [f"{locate(recipe_where, ('stages', name, 'args', 'async_steps'), source)}: {problem}"]
    if getattr(train, "padding_free", False) and (kind_spec.privileged or spec.data.video is not None):
        what = "a `distill` stage's two-prompt forwards are" if kind_spec.privileged else "video rows (3-D positions) are"
        return None, [f"{locate(recipe_where, ('stages', name, 'args', 'padding_free'), source)}: "
                      f"stages.{name}.args.padding_free: {what} not packed; remove it"]
    synthesizer = None
    if kind_spec.synthesizer:
        synth_model = stage_args_model("synthesizer", kind_spec.synthesizer, True)
        try:
            synthesizer = split_args(synth_model(**spec.synthesizer.args), kind_spec.synthesizer, True)
        except ValidationError as exc:
            return None, validation_errors(exc, synth_model, ("stages", name, "synthesizer", "args"), recipe_where, source)
    return Stage(name=name, kind=kind, spec=spec, train=train, algo=algo, synthesizer=synthesizer), []


def async_problem(name: str, kind: str, kind_spec, engine: str, train, algo) -> str | None:
    """Why `args.async_steps` > 0 cannot run honestly in this stage (None when it can, or when it is 0):
    generation must run in its own processes (a colocated engine shares the learner's process, `hf` its very
    weights), stale samples need the importance correction `tis_cap`, and only the RL loop has a rollout thread."""
    k = getattr(train, "async_steps", 0)
    where = f"stages.{name}.args.async_steps"
    if not k:
        return None
    if kind_spec.privileged or kind_spec.synthesizer:
        return f"{where}: a `{kind}` stage samples synchronously (no rollout thread); use async_steps: 0"
    if engine != "vllm_server":
        return (f"{where}: {k} needs `engine: vllm_server` (generation in its own processes); the `{engine}` engine "
                f"shares the learner's process")
    if not hasattr(algo, "tis_cap"):
        return (f"{where}: the `{kind}` algorithm has no importance correction for samples from older weights "
                f"(tis_cap); use async_steps: 0")
    if algo.tis_cap is None:
        return f"{where}: {k} samples from weights up to {k} steps old; set `tis_cap` (e.g. 2.0) so their sampler " \
               f"log-probs correct the loss"
    return None


_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_RESERVED_NAMES = {"eval", "init-model"}  # directories the run itself writes beside the stages'


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Resolved:
    """Read, merge, override and validate a recipe; raise one `UserError` listing every problem."""
    path = Path(path)
    data, where = _with_base(path)
    _apply_overrides(data, where, list(overrides))
    source = str(path)
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        raise UserError("\n".join(validation_errors(exc, Recipe, (), where, source))) from None
    stages, problems = [], []
    for name, spec in recipe.stages.items():
        if not _STAGE_NAME.fullmatch(name) or name in _RESERVED_NAMES:
            problems.append(f"{locate(where, ('stages', name), source)}: stages.{name}: a stage name becomes a "
                            f"directory of the run: use letters, digits, `_`, `-` and `.` (no `/`, not `..`), "
                            f"and none of {', '.join(sorted(_RESERVED_NAMES))}")
            continue
        stage, errs = _validate_stage(name, spec, where, source)
        problems += errs
        if stage is not None:
            stages.append(stage)
    if problems:
        raise UserError("\n".join(problems))
    return Resolved(recipe=recipe, stages=stages, raw=data, source=source, where=where)


def check_batch_geometry(resolved: Resolved, num_processes: int) -> None:
    """Every stage's global batch must split into whole micro-batches on every process."""
    problems = [
        f"{resolved.locate('stages', stage.name, 'args')}: stages.{stage.name}.args: {problem}"
        for stage in resolved.stages
        for problem in geometry_problems(stage.train, num_processes)
    ]
    problems += [
        f"{resolved.locate('stages', stage.name, 'synthesizer', 'args')}: stages.{stage.name}.synthesizer.args: {problem}"
        for stage in resolved.stages if stage.synthesizer is not None
        for problem in geometry_problems(stage.synthesizer[0], num_processes)
    ]
    if problems:
        raise UserError("\n".join(problems))


def accumulation_steps(train: TrainArgs, num_processes: int) -> int:
    return train.batch_size // (train.micro_batch_size * num_processes)


def _looks_local(path: str) -> bool:
    return Path(path).suffix in (".json", ".jsonl", ".parquet", ".csv", ".txt") or path.startswith(("./", "../", "/"))


def check_files(resolved: Resolved) -> None:
    """Local files a recipe names must exist (hub ids are left to load time). Paths are relative to the
    working directory, as for every command line tool."""
    recipe, wanted = resolved.recipe, []
    if recipe.model.new is not None:
        wanted += [("model.new.tokenizer_corpus", p) for p in recipe.model.new.tokenizer_corpus]
    elif recipe.model.path.startswith(("./", "../", "/")):
        wanted.append(("model.path", recipe.model.path))
    if recipe.eval is not None:
        wanted += _eval_files(resolved)
    for stage in resolved.stages:
        data = stage.spec.data
        wanted.append((f"stages.{stage.name}.data.path", data.path))
        if data.validation and Path(data.validation).suffix:
            wanted.append((f"stages.{stage.name}.data.validation", data.validation))
    missing = [
        f"{resolved.source}: {key}: `{path}` not found (relative to {Path.cwd()})"
        for key, path in wanted
        if _looks_local(path) and not Path(path).exists()
    ]
    if missing:
        raise UserError("\n".join(missing))


def _eval_files(resolved: Resolved) -> list[tuple[str, str]]:
    """Resolve the `eval:` benchmark specs (unknown names and bad keys fail here) and list their data files."""
    from posttrain.recipe.benchmark import data_path, recipe_benchmarks

    specs, data = recipe_benchmarks(resolved.recipe.eval, resolved.source)
    files = []
    for i, spec in enumerate(specs):
        try:
            files.append((f"eval.benchmarks.{i}.data", data_path(spec, data.get(spec.name), f"`eval.benchmarks.{i}.data: PATH`")))
        except UserError as err:
            raise UserError(f"{resolved.locate('eval', 'benchmarks', i)}: eval.benchmarks.{i}: {err}") from None
    return files
