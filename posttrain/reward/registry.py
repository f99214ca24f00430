"""The reward registry: verifier names → functions, and what each verifier reads and accepts.

Names resolve, in order, through `BUILTIN`, `@register`, the `posttrain.rewards` entry-point group, and
`module:function` / `path/to/file.py:function`. `bind` checks a `RewardSpec`'s settings against the function.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from posttrain.errors import UserError, describe, did_you_mean
from posttrain.recipe.scoring import RewardSpec

# name -> "module:function". One line per built-in; the modules are imported only when used.
BUILTIN: dict[str, str] = {
    "math": "posttrain.rewards.math:math_reward",        # \boxed{} / <answer> / "the answer is" vs `answer`
    "exact": "posttrain.rewards.exact:exact_reward",     # normalised string equality with `answer`
    "format": "posttrain.rewards.format:format_reward",  # <think>…</think><answer>…</answer> or a regex
    "length": "posttrain.rewards.length:length_reward",  # DAPO overlong shaping from len(completion_ids)
    "temporal_iou": "posttrain.rewards.temporal:temporal_iou_reward",  # IoU of the named span with `span`
}
# Built-ins that are pure and bounded (linear-time string work, no sympy, no I/O) run in the trainer's process:
# a worker round trip costs more than they do. `format` only with its own tag pattern (a user's regex can
# backtrack for ever). `math` and every user verifier keep the worker pool's isolation and timeout.
IN_PROCESS = {"exact", "length", "temporal_iou", "format"}


def in_process(spec: RewardSpec) -> bool:
    """Whether the Scorer may call this reward in its own process (see `IN_PROCESS`)."""
    return spec.name in IN_PROCESS and not (spec.name == "format" and "pattern" in spec.kwargs)


ENTRY_POINT_GROUP = "posttrain.rewards"
_REGISTERED: dict[str, Callable] = {}
_CONTRACT = ("prompts", "completions", "completion_ids")  # passed by the Scorer, never columns or settings


# --------------------------------------------------------------------------------------------------- registry
def register(name: str):
    """Decorator: make a batch-contract verifier (or a `@per_row` one) available as `name` in recipes.

        @register("brevity")
        @per_row
        def brevity(completion, *, limit=200, **row): return float(len(completion) <= limit)

    The function must live at module level in an importable module, so worker processes can load it.
    """
    def decorate(fn: Callable) -> Callable:
        if name in BUILTIN:
            raise UserError(f"cannot register reward `{name}`: that is a built-in name; choose another")
        old = _REGISTERED.get(name)
        if old is not None and _qualname(old) != _qualname(fn):
            raise UserError(
                f"cannot register reward `{name}` to {_qualname(fn)}: already registered to {_qualname(old)}"
            )
        _REGISTERED[name] = fn
        return fn

    return decorate


def available() -> list[str]:
    """Every reward name that resolves without a `module:function` reference."""
    return sorted(set(BUILTIN) | set(_REGISTERED) | set(_entry_points()))


def resolve(name: str) -> Callable:
    """The verifier called `name` (unbound: no settings applied). Raises UserError for an unknown name."""
    if name in BUILTIN:
        return _load_reference(BUILTIN[name], name)
    if name in _REGISTERED:
        return _REGISTERED[name]
    entry = _entry_points().get(name)
    if entry is not None:
        try:
            return entry.load()
        except Exception as err:
            raise UserError(f"reward `{name}` (entry point {entry.value}) failed to load: {describe(err)}") from err
    if ":" in name:
        return _load_reference(name, name)
    raise UserError(
        f"unknown reward `{name}`{did_you_mean(name, available())}. Valid: {', '.join(available())}; "
        f"or give `module:function` or `path/to/file.py:function`"
    )


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _load_reference(ref: str, name: str) -> Callable:
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise UserError(f"reward `{name}`: expected `module:function` or `path/to/file.py:function`")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"reward `{name}`: no such file {target}")
        fn = FileFunction(str(path), attr)
        bounded_import(fn.load, f"reward `{name}`: `{target}`")  # fail now, with a clear message, not in a worker
        return fn
    try:
        module = bounded_import(lambda: _import_from_cwd_too(target), f"reward `{name}`: `{target}`")
    except ImportError as err:
        raise UserError(f"reward `{name}`: cannot import `{target}` (from the current directory {Path.cwd()} "
                        f"or an installed package): {describe(err)}") from err
    except Exception as err:
        raise UserError(f"reward `{name}`: importing `{target}` failed: {describe(err)}") from err
    return _attribute(module, attr, name, target)


IMPORT_TIMEOUT_S = 60.0  # a verifier module that has not finished importing by then is taken to hang


def bounded_import(load: Callable, what: str):
    """`load()` (an import) in a daemon thread, so that a module that hangs at import (a network call, a lock)
    becomes a UserError after `IMPORT_TIMEOUT_S` instead of hanging `posttrain validate` and training."""
    box: dict = {}

    def target():
        try:
            box["value"] = load()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name="posttrain-import", daemon=True)
    thread.start()
    thread.join(IMPORT_TIMEOUT_S)
    if thread.is_alive():
        raise UserError(f"{what} did not finish importing within {IMPORT_TIMEOUT_S:g} s: does the module hang at "
                        f"import (a network call, a lock, an input() prompt)?")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _import_from_cwd_too(target: str):
    """Import `target` as `python -m posttrain` would: a module or package in the current directory resolves too.
    The `posttrain` console script's sys.path holds its own bin directory instead of the working directory, so the
    working directory is put first on sys.path (as `python -m` does) when it holds the module's top-level name;
    worker processes inherit sys.path, so they import it the same way."""
    cwd = os.getcwd()
    top = target.split(".")[0]
    on_path = any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path)
    if not on_path and (os.path.isdir(os.path.join(cwd, top)) or os.path.isfile(os.path.join(cwd, top + ".py"))):
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    return importlib.import_module(target)


def _attribute(module, attr: str, name: str, where: str) -> Callable:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise UserError(f"reward `{name}`: {where} has no `{attr}`{did_you_mean(attr, public) if public else ''}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward `{name}`: `{where}:{attr}` is not a function")
    return obj


_FILE_MODULES: dict[str, Any] = {}


class FileFunction:
    """A verifier from `path/to/file.py:function`. It pickles as (path, name) and each process loads the file
    itself, so files that are not on `sys.path` work in worker processes too."""

    def __init__(self, path: str, attr: str):
        self.path, self.attr = path, attr

    def load(self) -> Callable:
        module = _FILE_MODULES.get(self.path)
        if module is None:
            spec = importlib.util.spec_from_file_location(f"_posttrain_reward_{len(_FILE_MODULES)}", self.path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                raise UserError(f"reward file {self.path} failed to load: {describe(err)}") from err
            _FILE_MODULES[self.path] = module
        return _attribute(module, self.attr, f"{self.path}:{self.attr}", self.path)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FileFunction({self.path}:{self.attr})"


def _signature(fn):
    target = fn.load() if isinstance(fn, FileFunction) else fn
    try:
        return target, inspect.signature(target, follow_wrapped=False)
    except (TypeError, ValueError):
        return target, None


def settings_of(fn) -> tuple[str, ...] | None:
    """The settings (recipe kwargs) a verifier accepts, or None when it takes any (`**kwargs`)."""
    target, sig = _signature(fn)
    if hasattr(target, "__reward_settings__"):
        return tuple(target.__reward_settings__)
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return tuple(n for n, p in sig.parameters.items() if n not in _CONTRACT and p.kind is not p.VAR_POSITIONAL)


def columns_of(fn) -> tuple[str, ...]:
    """The dataset columns a verifier needs (named parameters without a default)."""
    target, sig = _signature(fn)
    if hasattr(target, "__reward_columns__"):
        return tuple(target.__reward_columns__)
    if sig is None:
        return ()
    return tuple(n for n, p in sig.parameters.items()
                 if n not in _CONTRACT and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def accepted_names(fn) -> set[str] | None:
    """Keyword arguments a (bound) verifier accepts, or None when it takes `**kwargs`."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    target, sig = _signature(target)
    if hasattr(target, "__reward_settings__") or sig is None:
        return None  # @per_row wrappers take **kwargs
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def bind(spec: RewardSpec) -> Callable:
    """The spec's verifier with its settings bound (functools.partial), after checking their names."""
    fn = resolve(spec.name)
    accepted = settings_of(fn)
    if accepted is not None:
        for key in spec.kwargs:
            if key not in accepted:
                hint = did_you_mean(key, accepted) if accepted else " (it takes none)"
                raise UserError(f"reward `{spec.key}` has no setting `{key}`{hint}")
    return functools.partial(fn, **spec.kwargs) if spec.kwargs else fn
