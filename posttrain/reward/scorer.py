"""The Scorer: every verifier once per row in the worker pool (`pool.py`), weights, abstention, fallbacks.

    total[i] = Σ_k weight_k · r_k[i]   over the rewards k that did not abstain on row i (no renormalisation,
                                       as TRL's nansum); a row where every reward abstains gets 0.0 and is
                                       flagged in `all_abstained`.

An exception, a timeout, a worker that dies, or a result that is not a finite number or None gives that
reward's `fallback` score for that row; it is counted (`failures`, `timeouts`), warned about once per
(reward, kind) with the message, and never stops the run.
"""

from __future__ import annotations

import functools
import math
import numbers
import pickle
import statistics
import time
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from posttrain.errors import UserError, describe
from posttrain.recipe.scoring import RewardSpec
from posttrain.reward.pool import Pool, call
from posttrain.reward.registry import _qualname, accepted_names, bind, columns_of, in_process

_RESERVED_COLUMNS = {"prompt", "prompts", "completion", "completions", "completion_ids"}


class RewardWarning(UserWarning):
    """A verifier failed, timed out or returned a non-number (the row got the fallback score)."""


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
        """`reward/<key>/{mean,std}`, `verifier/<key>/{failures,timeouts,abstained}`, `reward/total/{mean,std}`,
        `reward/all_abstained`."""
        out: dict[str, float] = {}
        for key, values in self.per_reward.items():
            scored = [v for v in values if v is not None]
            if scored:
                out[f"reward/{key}/mean"] = statistics.fmean(scored)
                out[f"reward/{key}/std"] = statistics.pstdev(scored)
            out[f"verifier/{key}/failures"] = float(self.failures[key])
            out[f"verifier/{key}/timeouts"] = float(self.timeouts[key])
            out[f"verifier/{key}/abstained"] = float(self.abstained[key])
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
        self._pool: Pool | None = None
        self._warned: set[tuple[str, str]] = set()
        self.totals = {s.key: {"calls": 0, "failures": 0, "timeouts": 0, "abstained": 0, "seconds": 0.0}
                       for s in self.specs}
        self._seconds: list[float] = []  # per job of the last `_run`
        self._local = [in_process(spec) for spec in self.specs]  # run here, not in a worker (pure and bounded)
        self._bad_streak = {s.key: 0 for s in self.specs}

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
        for j, spent in enumerate(self._seconds):
            self.totals[self.specs[j % len(self.specs)].key]["seconds"] += spent
        for key, total in self.totals.items():
            total["calls"] += n
            total["failures"] += result.failures[key]
            total["timeouts"] += result.timeouts[key]
            total["abstained"] += result.abstained[key]
        self._check_failure_share(result, n)
        return result

    def _check_failure_share(self, result: ScoreResult, n: int) -> None:
        """Stop (UserError) once a reward failed or timed out on more than `max_failure_share` of the rows of
        `failure_patience` batches in a row: a broken verifier must not train on its fallback score for ever."""
        for spec in self.specs:
            bad = result.failures[spec.key] + result.timeouts[spec.key]
            over = spec.max_failure_share is not None and n > 0 and bad / n > spec.max_failure_share
            self._bad_streak[spec.key] = self._bad_streak[spec.key] + 1 if over else 0
            if self._bad_streak[spec.key] >= spec.failure_patience:
                example = next((m for k, _, _, m in result.issues if k == spec.key), "")
                raise UserError(f"reward `{spec.key}` failed or timed out on {bad} of {n} rows, more than "
                                f"max_failure_share {spec.max_failure_share:g}, in {spec.failure_patience} scoring "
                                f"batches in a row (last: {example}); fix the verifier, or raise the reward's "
                                f"`max_failure_share` (None: never stop)")

    def summary(self) -> str:
        """One line per reward over every `score` call so far: calls, failures, timeouts, abstentions, seconds."""
        lines = []
        for key, t in self.totals.items():
            lines.append(f"reward `{key}`: {t['calls']} calls, {t['failures']} failures, {t['timeouts']} timeouts, "
                         f"{t['abstained']} abstained, {t['seconds']:.1f} s in the verifier")
        return "\n".join(lines)

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
        """Every job's (status, payload); `self._seconds[j]`: the time job j took. Built-ins that are pure and
        bounded (`in_process`) run here, the others in the worker pool (started only when one needs it)."""
        out: list = [None] * len(jobs)
        self._seconds = [0.0] * len(jobs)
        pooled = []
        for j, (k, kwargs, _) in enumerate(jobs):
            if self.workers and not self._local[k]:
                pooled.append(j)
                continue
            began = time.perf_counter()
            out[j] = call(self._fns[k], kwargs)
            self._seconds[j] = time.perf_counter() - began
        if pooled:
            if self._pool is None:
                self._pool = Pool(self._fns, self.workers, self.memory_mb, self.start_method)
            try:
                results = self._pool.run([jobs[j] for j in pooled])
            except BaseException:
                self.close()  # interrupted or broken: never leave a half-used pool behind
                raise
            for j, result, spent in zip(pooled, results, self._pool.last_seconds):
                out[j], self._seconds[j] = result, spent
        return out

    def _warn(self, spec: RewardSpec, row: int, kind: str, message: str) -> None:
        if (spec.key, kind) in self._warned:
            return
        self._warned.add((spec.key, kind))
        score = "abstains" if spec.fallback is None else f"scores the fallback {spec.fallback:g}"
        counter = "timeouts" if kind == "timeout" else "failures"
        warnings.warn(
            f"reward `{spec.key}` {kind} on row {row}: {message}. The row {score}; further {kind}s of this reward "
            f"are only counted (verifier/{spec.key}/{counter}).", RewardWarning, stacklevel=3,
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
                        f"({describe(err)}). {hint}") from err


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
