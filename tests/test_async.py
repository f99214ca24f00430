"""Asynchronous RL plumbing without vLLM (the prefetcher's staleness bound, the engine lock) and the recipe checks of
the RL-loop keys (`async_steps`, `padding_free`) where they cannot run."""

import threading
import time

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


def _load(tmp_path, kind: str, engine: str, **args):
    from helpers import write_addition_data, write_recipe

    from posttrain.recipe import load_recipe

    data = write_addition_data(tmp_path / "data")
    stage = {"data": {"path": f"{data}/train.jsonl", "template": "plain"}, "engine": engine,
             "args": {"steps": 2, **args}}
    if kind == "spo":
        stage["judge"] = {"kind": "rule", "reward": {"name": "exact"}}
    elif kind == "distill":
        stage.update(privileged={"column": "answer"}, rewards=[{"name": "exact"}])
    else:
        stage["rewards"] = [{"name": "exact"}]
    recipe = {"name": "a", "model": {"path": "unused"}, "stages": {kind: stage}}
    return load_recipe(write_recipe(tmp_path, recipe))


def test_async_steps_is_refused_where_it_cannot_be_honest(tmp_path):
    """At load time (so `posttrain validate` says it, with the recipe line): only the RL loop has a rollout
    thread, only a server engine generates outside the learner's process, and stale samples need tis_cap."""
    assert _load(tmp_path, "grpo", "vllm_server", async_steps=2, tis_cap=2.0).stages[0].train.async_steps == 2
    _load(tmp_path, "spo", "vllm_server", async_steps=1, tis_cap=2.0)
    _load(tmp_path, "grpo", "hf", async_steps=0)
    for kind, engine, args, message in [
        ("grpo", "vllm", {"tis_cap": 2.0}, "needs `engine: vllm_server`"),
        ("grpo", "vllm_server", {}, "set `tis_cap`"),
        ("nft", "vllm_server", {}, "no importance correction"),
        ("distill", "vllm_server", {}, "samples synchronously"),
    ]:
        with pytest.raises(UserError, match=rf"t\.yaml:\d+: stages\.{kind}\.args\.async_steps: .*{message}"):
            _load(tmp_path, kind, engine, async_steps=1, **args)


def test_padding_free_is_refused_where_rows_are_not_packed(tmp_path):
    with pytest.raises(UserError, match=r"stages\.distill\.args\.padding_free: a `distill` stage"):
        _load(tmp_path, "distill", "hf", padding_free=True)
    assert _load(tmp_path, "grpo", "hf", padding_free=True).stages[0].train.padding_free
