"""THE ROLLOUT ENGINE: one narrow protocol every RL stage samples through, and its backends.

Stages only ever see `RolloutEngine`, `SamplingParams` and `Completion` (from `posttrain.rollout.base`) and
build an engine with `make_engine(kind, **kwargs)`; backends (`hf`, `vllm`) are imported lazily, so
importing this package never pulls in torch, transformers or vllm.
"""

from posttrain.rollout.base import (
    ENGINES,
    Completion,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    make_engine,
)

__all__ = ["ENGINES", "Completion", "RolloutEngine", "RolloutError", "SamplingParams", "make_engine"]
