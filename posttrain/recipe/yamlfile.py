"""YAML files with line numbers, and pydantic errors as `file:line: key.path: what is wrong`.

Shared by the recipe loader (`load.py`) and the benchmark specs (`benchmark.py`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.errors import UserError, did_you_mean

Where = dict[tuple, str]  # key path -> "file:line" (or "override `k=v`")


def read_yaml(path: Path) -> tuple[dict, Where]:
    """The mapping in `path` and the `file:line` of every key (duplicate keys are an error)."""
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{at}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    where: Where = {}
    _index_lines(node, (), path, where)
    return data, where


def _index_lines(node, prefix: tuple, path: Path, where: Where) -> None:
    """Record `file:line` of every key; reject duplicate keys (YAML would silently keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            loc = f"{path}:{key_node.start_mark.line + 1}"
            if key in seen:
                raise UserError(f"{loc}: {'.'.join(map(str, prefix + (key,)))}: duplicate key")
            seen.add(key)
            where[prefix + (key,)] = loc
            _index_lines(value_node, prefix + (key,), path, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where[prefix + (i,)] = f"{path}:{item.start_mark.line + 1}"
            _index_lines(item, prefix + (i,), path, where)


def deep_merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def locate(where: Where, loc: tuple, source: str) -> str:
    """The best known `file:line` for a key path: the path itself or its nearest ancestor."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in where:
            return where[loc[:end]]
    return source


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (the parent of an unknown key), walking the schema."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            # inside a dict[str, Model]: the part is a user-chosen name (e.g. a stage name)
            continue
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None if get_origin(annotation) is None else None


def _describe(err: dict, model: type[BaseModel], prefix: tuple) -> tuple[tuple, str]:
    loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(map(str, loc))
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(model, tuple(err["loc"][:-1]))
        hint = did_you_mean(str(loc[-1]), valid) if valid else ""
        return loc, f"{key}: unknown key{hint}"
    if err["type"] == "missing":
        return loc, f"{key}: required key is missing"
    got = err.get("input")
    shown = f", got {got!r}" if not isinstance(got, dict) and got is not None else ""
    return loc, f"{key}: {err['msg'][0].lower()}{err['msg'][1:]}{shown}"


def validation_errors(exc: ValidationError, model, prefix: tuple, where: Where, source: str) -> list[str]:
    """One `file:line: key.path: message` line per pydantic error (unknown keys get a suggestion)."""
    lines = []
    for err in exc.errors():
        loc, message = _describe(err, model, prefix)
        lines.append(f"{locate(where, loc, source)}: {message}")
    return lines
