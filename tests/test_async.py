"""Asynchronous RL plumbing without vLLM: the prefetcher's staleness bound, the engine lock, the refusals."""

import threading
import time
from types import SimpleNamespace

import pytest

from posttrain.errors import UserError
from posttrain.stages import asynchronous


class FakeEngine:
    """Generation and syncs that take time and record what overlapped."""

    def __init__(self):
        self.busy = threading.Lock()
        self.overlaps = 0

    def generate(self, prompts, sampling):
        if not self.busy.acquire(blocking=False):
            self.overlaps += 1
            self.busy.acquire()
        time.sleep(0.01)
        self.busy.release()
        return []

    def load_weights(self, named):
        self.generate(None, None)


def _drive(k: int, steps: int = 8, train_seconds: float = 0.02) -> tuple[list[int], FakeEngine]:
    """The RL loop's use of the two: batch `step` sampled (maybe ahead), trained, synced."""
    inner = FakeEngine()
    engine = asynchronous.VersionedEngine(inner)

    def sample(step):
        engine.generate([], None)
        return engine.last_version

    prefetcher = asynchronous.Prefetcher(sample, k, steps)
    staleness = []
    try:
        for step in range(steps):
            version = prefetcher.get(step)
            staleness.append(engine.version - version)  # learner steps beyond the batch's weights
            time.sleep(train_seconds)  # training
            engine.load_weights(())
    finally:
        prefetcher.close()
    return staleness, inner


def test_synchronous_loop_samples_every_batch_from_the_current_weights():
    staleness, _ = _drive(0)
    assert staleness == [0] * 8


@pytest.mark.parametrize("k", [1, 2])
def test_async_batches_are_at_most_k_versions_old_and_generation_overlaps_training(k):
    staleness, inner = _drive(k)
    assert staleness[0] == 0 and max(staleness) <= k
    assert max(staleness) == k  # the next batches were sampled while the learner trained
    assert inner.overlaps == 0  # the lock: never a generation during a sync


def test_prefetcher_stops_at_the_last_step_and_closes_cleanly():
    calls = []
    prefetcher = asynchronous.Prefetcher(lambda j: calls.append(j) or j, 3, 4)
    assert [prefetcher.get(s) for s in range(4)] == [0, 1, 2, 3]
    prefetcher.close()
    assert calls == [0, 1, 2, 3]


def _stage(k, engine="vllm_server", tis_cap=2.0, algo_has_tis=True):
    algo = SimpleNamespace(tis_cap=tis_cap) if algo_has_tis else SimpleNamespace()
    return SimpleNamespace(name="grpo", train=SimpleNamespace(async_steps=k), algo=algo,
                           spec=SimpleNamespace(kind="grpo"))


def test_async_steps_is_refused_where_it_cannot_be_honest():
    assert asynchronous.check(_stage(0, engine="hf"), "hf") == 0
    assert asynchronous.check(_stage(2), "vllm_server") == 2
    with pytest.raises(UserError, match="needs `engine: vllm_server`"):
        asynchronous.check(_stage(1), "vllm")
    with pytest.raises(UserError, match="set `tis_cap`"):
        asynchronous.check(_stage(1, tis_cap=None), "vllm_server")
    with pytest.raises(UserError, match="no importance correction"):
        asynchronous.check(_stage(1, algo_has_tis=False), "vllm_server")
