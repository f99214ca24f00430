"""The verifier worker pool: spawned processes, one pipe each, a hard timeout per call.

Our own small pool (not concurrent.futures, which cannot stop a running task, and not pebble, whose workers
share one pipe and lock). Each worker is a `spawn`ed process with its own pipe: a task that overruns its
timeout gets its worker killed (SIGTERM, then SIGKILL) and a fresh one started, which never disturbs the others.
Workers load the verifiers once when they start and report ready before they get work, so start-up and imports
are not charged to any row's timeout. They are kept across calls and stopped by `Pool.close()` (or interpreter
exit). It isolates faults; it is not a sandbox: a verifier runs with the trainer's user, files and network.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (import before our atexit hook, so that hook runs first)
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

from posttrain.errors import UserError, describe


def call(fn: Callable, kwargs: dict) -> tuple[str, Any]:
    try:
        return "ok", fn(**kwargs)
    except Exception as err:
        return "error", describe(err)


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
        conn.send(("init_error", describe(err, 2000)))
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
            reply = (job, "error", describe(err))
        try:
            conn.send(reply)
        except Exception as err:  # the result does not pickle
            conn.send((job, "invalid", f"result could not be sent back: {describe(err)}"))


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


class Pool:
    """N worker processes, one pipe each; `run` hands out jobs and enforces each job's timeout."""

    def __init__(self, fns: list[Callable], size: int, memory_mb: int | None, start_method: str):
        self.payload = pickle.dumps(fns)
        self.ctx = multiprocessing.get_context(start_method)
        self.size, self.memory_mb = size, memory_mb
        # PR_SET_PDEATHSIG fires when the creating *thread* exits: use it only from the main thread.
        self.die_with_parent = threading.current_thread() is threading.main_thread()
        self.workers: list[_Worker] = []
        self.failed_starts = 0
        self.last_seconds: list[float] = []
        self._started: dict[int, float] = {}
        _POOLS.add(self)

    def _start_worker(self) -> None:
        self.workers.append(_Worker(self.ctx, self.payload, self.memory_mb, self.die_with_parent))

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        self.workers.remove(worker)

    def run(self, jobs: list[tuple[int, dict, float]]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any] | None] = [None] * len(jobs)
        self.last_seconds = [0.0] * len(jobs)  # per job: from handing it to a worker to its result (or timeout)
        self._started: dict[int, float] = {}
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
                    self._started[j] = time.monotonic()
            self._wait(out)
            now = time.monotonic()
            for w in list(self.workers):
                if w.job is not None and now > w.job[1]:
                    j = w.job[0]
                    out[j] = ("timeout", f"no result after {jobs[j][2]:g} s; its worker was killed and replaced")
                    self.last_seconds[j] = now - self._started[j]
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
            self.last_seconds[message[0]] = time.monotonic() - self._started.get(message[0], time.monotonic())
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
