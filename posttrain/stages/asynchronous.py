"""Asynchronous RL: the rollout of step t+k runs on a worker thread while the learner trains on step t.

    main thread:   train t ──── sync(v=t+1) ── train t+1 ──── sync(v=t+2) ── …
    worker thread: ── sample t+1 (v=t) ──────── sample t+2 (v=t+1) ────────── …

`async_steps: k` (0: synchronous). Batch j is submitted when the learner starts step j−k, i.e. after j−k
weight syncs, and batches are sampled in order on one thread, so batch j comes from weight version ≥ j−k:
staleness (learner version − batch version) is at most k. One lock orders generation and weight syncs: a
batch is sampled from one weight version, never from weights half way through a sync (a sync waits for the
batch in flight, a batch waits for the sync in flight). The stale batch's sampler log-probs enter the loss
through the algorithm's importance correction (`tis_cap`): w = min(π_θ_old / π_sampler, C), with π_θ_old the
learner's recomputed log-probs at the step it trains on.

Resume: after `--resume` from the checkpoint of step s, batches s … s+k−1 are sampled again from the
checkpoint's weights (version s), one to k versions fresher than in the uninterrupted run; the data order is
the same (a function of the step). With k = 0 resume stays bit-exact.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor


class VersionedEngine:
    """A rollout engine behind one lock, counting weight versions (syncs). `last_version`: the version the last
    `generate` sampled from. Everything else is the wrapped engine's."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.version = 0
        self.last_version = 0

    def generate(self, prompts, sampling):
        with self.lock:
            self.last_version = self.version
            return self.engine.generate(prompts, sampling)

    def load_weights(self, named_tensors) -> None:
        with self.lock:
            self.engine.load_weights(named_tensors)
            self.version += 1

    def __getattr__(self, name):
        return getattr(self.engine, name)


class Prefetcher:
    """`sample(step)` for steps `step … step+k` submitted to one worker thread; `get(step)` waits for one."""

    def __init__(self, sample, k: int, total_steps: int):
        self.sample, self.k, self.total = sample, k, total_steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-rollout")
        self.pending: dict[int, Future] = {}
        self.waited = 0.0  # seconds the learner waited for its last batch

    def get(self, step: int):
        start = time.perf_counter()
        try:
            if not self.k:  # synchronous: sampled here, on the caller's thread, exactly as without a prefetcher
                return self.sample(step)
            for j in range(step, min(step + self.k, self.total - 1) + 1):
                if j not in self.pending:
                    self.pending[j] = self.pool.submit(self.sample, j)
            return self.pending.pop(step).result()
        finally:
            self.waited = time.perf_counter() - start

    def close(self) -> None:
        """Drop batches not started; wait for the one in flight (it holds the engine's lock)."""
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)
