"""Reward registry and Scorer: weights, per-row verifier calls, abstention, timeouts, fallback scores.

The verifier contract is TRL's reward-function signature, so TRL reward functions work unchanged:

    f(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float | None]

Dataset columns arrive by name as lists (`answer=[...]`); a verifier takes `**kwargs` for the ones it does not
read. `None` means abstain: that reward is left out of that row's total. Built-ins are per-row functions lifted to
this contract by `@per_row` (see `posttrain.rewards`). Names resolve, in order, through `BUILTIN`, `@register`,
the `posttrain.rewards` entry-point group, and `module:function` / `path/to/file.py:function`.

The Scorer calls every verifier once per row (a list of length 1), each call in a worker process with a hard
timeout, so one adversarial row cannot take the others down. An exception, a timeout, a worker that dies, or a
result that is not a finite number or None gives that reward's `fallback` score for that row; it is counted
(`failures`, `timeouts`), warned about once per (reward, kind) with the message, and never stops the run.

    total[i] = Σ_k weight_k · r_k[i]   over the rewards k that did not abstain on row i (no renormalisation,
                                       as TRL's nansum); a row where every reward abstains gets 0.0 and is
                                       flagged in `all_abstained`.

Isolation: our own small pool (not concurrent.futures, which cannot stop a running task, and not pebble, whose
workers share one pipe and lock). Each worker is a `spawn`ed process with its own pipe: a task that overruns its
timeout gets its worker killed (SIGTERM, then SIGKILL) and a fresh one started, which never disturbs the others.
Workers load the verifiers once when they start and report ready before they get work, so start-up and imports
are not charged to any row's timeout. They are kept across `score` calls and stopped by `Scorer.close()` (or the
context manager, or interpreter exit). `workers=0` runs in-process for debugging: no isolation and no timeouts.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (import before our atexit hook, so that hook runs first)
import numbers
import os
import pickle
import signal
import statistics
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from posttrain.errors import UserError, did_you_mean
from posttrain.rewards import per_row

__all__ = [
    "BUILTIN", "ENTRY_POINT_GROUP", "RewardSpec", "RewardWarning", "ScoreResult", "Scorer", "available", "bind",
    "per_row", "register", "resolve",
]

# name -> "module:function". One line per built-in; the modules are imported only when used.
BUILTIN: dict[str, str] = {
    "math": "posttrain.rewards.math:math_reward",        # \boxed{} / <answer> / "the answer is" vs `answer`
    "exact": "posttrain.rewards.exact:exact_reward",     # normalised string equality with `answer`
    "format": "posttrain.rewards.format:format_reward",  # <think>…</think><answer>…</answer> or a regex
    "length": "posttrain.rewards.length:length_reward",  # DAPO overlong shaping from len(completion_ids)
    "temporal_iou": "posttrain.rewards.temporal:temporal_iou_reward",  # IoU of the named span with `span`
}
ENTRY_POINT_GROUP = "posttrain.rewards"
_REGISTERED: dict[str, Callable] = {}
_CONTRACT = ("prompts", "completions", "completion_ids")  # passed by the Scorer, never columns or settings
_RESERVED_COLUMNS = {"prompt", "prompts", "completion", "completions", "completion_ids"}


class RewardWarning(UserWarning):
    """A verifier failed, timed out or returned a non-number (the row got the fallback score)."""


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
            raise UserError(f"reward `{name}` (entry point {entry.value}) failed to load: {_describe(err)}") from err
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
        fn.load()  # fail now, with a clear message, not in a worker
        return fn
    try:
        module = importlib.import_module(target)
    except ImportError as err:
        raise UserError(f"reward `{name}`: cannot import `{target}`: {_describe(err)}") from err
    except Exception as err:
        raise UserError(f"reward `{name}`: importing `{target}` failed: {_describe(err)}") from err
    return _attribute(module, attr, name, target)


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
                raise UserError(f"reward file {self.path} failed to load: {_describe(err)}") from err
            _FILE_MODULES[self.path] = module
        return _attribute(module, self.attr, f"{self.path}:{self.attr}", self.path)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FileFunction({self.path}:{self.attr})"


# ------------------------------------------------------------------------------------------------------ specs
class RewardSpec(BaseModel):
    """One reward of a recipe: which verifier, its weight in the total, and how failures score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="built-in, @register name, entry point, or module:function")
    weight: float = Field(1.0, description="its weight in the total: Σ_k weight_k · r_k over non-abstaining k")
    fallback: float | None = Field(0.0, description="score on an exception, timeout or non-finite result "
                                                    "(None: abstain instead)")
    timeout: float = Field(10.0, gt=0, description="seconds one row may take in its worker before it is killed")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the verifier's settings (functools.partial)")
    label: str | None = Field(None, description="name in metrics and results; default: `name`, or the "
                                                "function name of a `module:function` reference")

    @field_validator("weight", "fallback")
    @classmethod
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def key(self) -> str:
        """The reward's name in `per_reward` and in metrics (`reward/<key>/mean`)."""
        if self.label:
            return self.label
        return self.name.rpartition(":")[2] if ":" in self.name else self.name


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


# ----------------------------------------------------------------------------------------------------- result
@dataclass
class ScoreResult:
    """Scores of one batch. `per_reward[key][i]` is the score used (fallback applied), None where it abstained."""

    total: list[float]
    per_reward: dict[str, list[float | None]]
    failures: dict[str, int]  # exceptions, dead workers, results that are not a finite number or None
    timeouts: dict[str, int]
    abstained: dict[str, int]  # the verifier itself returned None
    all_abstained: list[bool]  # rows whose total is 0.0 because every reward abstained
    # (reward, row, kind, message), kind: "error" | "invalid" (not a finite number or None) | "crash" | "timeout"
    issues: list[tuple[str, int, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """`reward/<key>/{mean,std,failures,timeouts,abstained}`, `reward/total/{mean,std}`, `reward/all_abstained`."""
        out: dict[str, float] = {}
        for key, values in self.per_reward.items():
            scored = [v for v in values if v is not None]
            if scored:
                out[f"reward/{key}/mean"] = statistics.fmean(scored)
                out[f"reward/{key}/std"] = statistics.pstdev(scored)
            out[f"reward/{key}/failures"] = float(self.failures[key])
            out[f"reward/{key}/timeouts"] = float(self.timeouts[key])
            out[f"reward/{key}/abstained"] = float(self.abstained[key])
        if self.total:
            out["reward/total/mean"] = statistics.fmean(self.total)
            out["reward/total/std"] = statistics.pstdev(self.total)
        out["reward/all_abstained"] = float(sum(self.all_abstained))
        out["time/reward_s"] = self.seconds
        return out


# ----------------------------------------------------------------------------------------------------- scorer
class Scorer:
    """Score completions with several weighted verifiers, each row isolated in a worker process.

        with Scorer([RewardSpec(name="math"), RewardSpec(name="format", weight=0.1)]) as scorer:
            result = scorer.score(prompts, completions, completion_ids, {"answer": answers})

    `workers=0` calls the verifiers in this process: for debugging only (exceptions still give the fallback,
    but a hanging verifier hangs the caller: timeouts are not enforced). `memory_mb` caps each worker's
    address space (RLIMIT_AS), so a blow-up fails that row with MemoryError instead of swapping the machine.
    `start_method` is the multiprocessing start method of the workers: keep "spawn" (or "forkserver") in
    training; "fork" would copy a process that holds CUDA state and threads.
    """

    def __init__(self, specs, workers: int = 2, *, memory_mb: int | None = None, start_method: str = "spawn"):
        self.specs = tuple(_as_spec(s) for s in specs)
        keys = [s.key for s in self.specs]
        for key in keys:
            if keys.count(key) > 1:
                raise UserError(f"reward `{key}` is listed twice; give one of them another `label`")
            if key == "total":
                raise UserError("`total` cannot name a reward (it is the weighted sum); set another `label`")
        if workers < 0:
            raise UserError(f"workers must be >= 0, got {workers}")
        self.workers, self.memory_mb, self.start_method = workers, memory_mb, start_method
        self._fns = [bind(s) for s in self.specs]
        self._columns = [columns_of(f) for f in self._fns]
        self._accepts = [accepted_names(f) for f in self._fns]
        if workers:
            for spec, fn in zip(self.specs, self._fns):
                _check_sendable(spec, fn)
        self._pool: _Pool | None = None
        self._warned: set[tuple[str, str]] = set()

    def score(self, prompts, completions, completion_ids=None, columns: dict[str, list] | None = None) -> ScoreResult:
        """Scores of each completion under every reward, and their weighted total (see module doc)."""
        start = time.perf_counter()
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [None] * n
        columns = {k: v for k, v in (columns or {}).items() if k not in _RESERVED_COLUMNS}
        for what, values in [("prompts", prompts), ("completion_ids", completion_ids), *columns.items()]:
            if values is not None and len(values) != n:
                raise ValueError(f"{what} has {len(values)} entries for {n} completions")
        self._check_columns(columns)

        jobs = []  # one per (row, reward): rewards interleaved so a slow one does not hold up the rest
        for i in range(n):
            row_args = {
                "prompts": [prompts[i]], "completions": [completions[i]],
                "completion_ids": None if completion_ids is None else [completion_ids[i]],
                **{k: [v[i]] for k, v in columns.items()},
            }
            for k, spec in enumerate(self.specs):
                accepts = self._accepts[k]  # a function without **kwargs gets only the arguments it names
                args = row_args if accepts is None else {a: v for a, v in row_args.items() if a in accepts}
                jobs.append((k, args, spec.timeout))
        outcomes = self._run(jobs)

        result = ScoreResult(
            total=[0.0] * n, per_reward={s.key: [None] * n for s in self.specs},
            failures={s.key: 0 for s in self.specs}, timeouts={s.key: 0 for s in self.specs},
            abstained={s.key: 0 for s in self.specs}, all_abstained=[True] * n,
        )
        for j, (status, payload) in enumerate(outcomes):
            i, k = divmod(j, len(self.specs))
            spec = self.specs[k]
            if status == "ok":
                status, payload = _check_value(payload)
            if status == "ok":
                value = payload
                result.abstained[spec.key] += value is None
            else:
                value = spec.fallback
                (result.timeouts if status == "timeout" else result.failures)[spec.key] += 1
                result.issues.append((spec.key, i, status, payload))
                self._warn(spec, i, status, payload)
            result.per_reward[spec.key][i] = value
            if value is not None:
                result.total[i] += spec.weight * value
                result.all_abstained[i] = False
        result.seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        """Stop the worker processes (a later `score` starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------------- internals
    def _check_columns(self, columns: dict) -> None:
        for spec, needed in zip(self.specs, self._columns):
            for column in needed:
                if column not in columns and column not in spec.kwargs:
                    have = ", ".join(sorted(columns)) or "none"
                    raise UserError(f"reward `{spec.key}` reads column `{column}`, which the data does not have "
                                    f"(columns: {have})")
            for key in spec.kwargs:
                if key in columns:
                    raise UserError(f"reward `{spec.key}`: setting `{key}` has the name of a dataset column; "
                                    f"rename the column or use another setting")

    def _run(self, jobs: list) -> list[tuple[str, Any]]:
        if not jobs:
            return []
        if self.workers == 0:
            return [_call(self._fns[k], kwargs) for k, kwargs, _ in jobs]
        if self._pool is None:
            self._pool = _Pool(self._fns, self.workers, self.memory_mb, self.start_method)
        try:
            return self._pool.run(jobs)
        except BaseException:
            self.close()  # interrupted or broken: never leave a half-used pool behind
            raise

    def _warn(self, spec: RewardSpec, row: int, kind: str, message: str) -> None:
        if (spec.key, kind) in self._warned:
            return
        self._warned.add((spec.key, kind))
        score = "abstains" if spec.fallback is None else f"scores the fallback {spec.fallback:g}"
        counter = "timeouts" if kind == "timeout" else "failures"
        warnings.warn(
            f"reward `{spec.key}` {kind} on row {row}: {message}. The row {score}; further {kind}s of this reward "
            f"are only counted (reward/{spec.key}/{counter}).", RewardWarning, stacklevel=3,
        )


def _as_spec(spec) -> RewardSpec:
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, str):
        return RewardSpec(name=spec)
    return RewardSpec.model_validate(spec)


def _check_sendable(spec: RewardSpec, fn: Callable) -> None:
    """Fail now, in this process, for verifiers that a worker process could not load."""
    hint = ("Define it at module level in an importable module (not a lambda, closure or notebook cell), "
            "or score with workers=0 (in-process, no timeouts)")
    target = fn.func if isinstance(fn, functools.partial) else fn
    main = sys.modules.get("__main__")
    if getattr(target, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise UserError(f"reward `{spec.key}`: {_qualname(target)} is defined in an interactive session, which "
                        f"worker processes cannot import. {hint}")
    try:
        pickle.dumps(fn)
    except Exception as err:
        raise UserError(f"reward `{spec.key}`: {_qualname(target)} cannot be sent to a worker process "
                        f"({_describe(err)}). {hint}") from err


def _check_value(result) -> tuple[str, Any]:
    """("ok", float | None) for a valid one-row result, else ("invalid", why). numpy/torch values are accepted."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__") or len(result) != 1:
        got = f"{len(result)} values" if hasattr(result, "__len__") else f"a {type(result).__name__}"
        return "invalid", f"returned {got} for 1 completion (expected a list with one float or None)"
    value = result[0]
    if value is None:
        return "ok", None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        value = value.item()  # numpy scalar, 0-d array or 1-element tensor
    if not isinstance(value, numbers.Real):
        return "invalid", f"returned a {type(value).__name__}, not a number or None"
    value = float(value)
    if not math.isfinite(value):
        return "invalid", f"returned {value}"
    return "ok", value


def _describe(err: BaseException, limit: int = 500) -> str:
    try:
        text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    except Exception:  # a message that cannot be rendered
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _call(fn: Callable, kwargs: dict) -> tuple[str, Any]:
    try:
        return "ok", fn(**kwargs)
    except Exception as err:
        return "error", _describe(err)


# ------------------------------------------------------------------------------------------------ worker pool
STARTUP_TIMEOUT_S = 120.0  # a worker that has not loaded the verifiers by then is a broken setup
_POOLS: weakref.WeakSet = weakref.WeakSet()


def _worker_main(conn, payload: bytes, memory_mb: int | None, die_with_parent: bool) -> None:
    """Worker process: load the verifiers, say ready, then run (job, k, kwargs) until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    if die_with_parent:
        _die_with_parent()
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        fns = pickle.loads(payload)
    except BaseException as err:
        conn.send(("init_error", _describe(err, 2000)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job, k, kwargs = message
        try:
            reply = (job, "ok", fns[k](**kwargs))
        except BaseException as err:  # SystemExit from a verifier too: this process keeps serving
            reply = (job, "error", _describe(err))
        try:
            conn.send(reply)
        except Exception as err:  # the result does not pickle
            conn.send((job, "invalid", f"result could not be sent back: {_describe(err)}"))


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the parent dies, even if it is stuck in C code."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _Worker:
    def __init__(self, ctx, payload: bytes, memory_mb: int | None, die_with_parent: bool):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, payload, memory_mb, die_with_parent),
                                   name="posttrain-reward", daemon=False)
        self.process.start()
        child.close()
        self.ready = False
        self.job: tuple[int, float] | None = None  # (job index, deadline)
        self.born = time.monotonic()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(0.5)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(2.0)
        self.conn.close()


class _Pool:
    """N worker processes, one pipe each; `run` hands out jobs and enforces each job's timeout."""

    def __init__(self, fns: list[Callable], size: int, memory_mb: int | None, start_method: str):
        self.payload = pickle.dumps(fns)
        self.ctx = multiprocessing.get_context(start_method)
        self.size, self.memory_mb = size, memory_mb
        # PR_SET_PDEATHSIG fires when the creating *thread* exits: use it only from the main thread.
        self.die_with_parent = threading.current_thread() is threading.main_thread()
        self.workers: list[_Worker] = []
        self.failed_starts = 0
        _POOLS.add(self)

    def _start_worker(self) -> None:
        self.workers.append(_Worker(self.ctx, self.payload, self.memory_mb, self.die_with_parent))

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        self.workers.remove(worker)

    def run(self, jobs: list[tuple[int, dict, float]]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any] | None] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        while pending or any(w.job for w in self.workers):
            while len(self.workers) < self.size:
                self._start_worker()
            for w in list(self.workers):
                if w.ready and w.job is None and pending:
                    j = pending.popleft()
                    k, kwargs, timeout = jobs[j]
                    try:
                        w.conn.send((j, k, kwargs))
                    except (OSError, ValueError):  # died while idle: the job never started
                        pending.appendleft(j)
                        self._retire(w)
                        continue
                    w.job = (j, time.monotonic() + timeout)
            self._wait(out)
            now = time.monotonic()
            for w in list(self.workers):
                if w.job is not None and now > w.job[1]:
                    j = w.job[0]
                    out[j] = ("timeout", f"no result after {jobs[j][2]:g} s; its worker was killed and replaced")
                    self._retire(w)
                elif not w.ready and now - w.born > STARTUP_TIMEOUT_S:
                    self.close()
                    raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:g} s")
        return out  # type: ignore[return-value]

    def _wait(self, out: list) -> None:
        deadlines = [w.job[1] for w in self.workers if w.job is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
        waitables = {}
        for w in self.workers:
            waitables[w.conn] = w
            waitables[w.process.sentinel] = w
        for ready in multiprocessing.connection.wait(list(waitables), timeout=min(timeout, 1.0)):
            w = waitables[ready]
            if w not in self.workers:
                continue  # retired earlier in this loop
            if ready is w.conn:
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    self._died(w, out)
                    continue
                self._handle(w, message, out)
            else:
                while w.conn.poll(0):  # a result sent just before it exited still counts
                    try:
                        self._handle(w, w.conn.recv(), out)
                    except (EOFError, OSError):
                        break
                self._died(w, out)

    def _handle(self, w: _Worker, message, out: list) -> None:
        if message[0] == "ready":
            w.ready = True
            self.failed_starts = 0
        elif message[0] == "init_error":
            self.close()
            raise UserError(
                f"reward worker processes could not load the verifiers: {message[1]}. Verifiers must be "
                f"importable by a fresh Python process (module-level functions in modules on sys.path); "
                f"workers=0 scores in-process instead"
            )
        elif w.job is not None and message[0] == w.job[0]:
            out[message[0]] = (message[1], message[2])
            w.job = None

    def _died(self, w: _Worker, out: list) -> None:
        if w not in self.workers:
            return
        w.process.join(1.0)
        code = w.process.exitcode
        if w.job is not None:
            out[w.job[0]] = ("crash", f"its worker process died (exit code {code}); a new one was started")
        elif not w.ready:
            self.failed_starts += 1
            if self.failed_starts >= 3:
                self.close()
                raise RuntimeError(f"reward worker processes keep dying on start-up (exit code {code})")
        self._retire(w)

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except Exception:
                pass
        deadline = time.monotonic() + 1.0
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            w.kill()
        self.workers = []


@atexit.register
def _close_all_pools() -> None:  # runs before multiprocessing's own exit hook, which would wait for workers
    for pool in list(_POOLS):
        try:
            pool.close()
        except Exception:
            pass
