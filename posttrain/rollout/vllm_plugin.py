"""vLLM's `vllm.general_plugins` entry point: registers posttrain's CPU weight-transfer backend.

vLLM calls `register()` in every process it starts (API server, engine core, workers) whenever posttrain is
installed in the same environment; a server started with `--weight-transfer-config '{"backend":
"posttrain_gloo"}'` then finds the backend by name. Registration names a module path only, so this costs no
import until the backend is used (posttrain/rollout/gloo_transfer.py).
"""

from __future__ import annotations

BACKEND = "posttrain_gloo"
MODULE = "posttrain.rollout.gloo_transfer"


def register() -> None:
    """Register the worker and trainer engines under `posttrain_gloo` (idempotent: vLLM may call it twice)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        if BACKEND not in factory._registry:
            factory.register_engine(BACKEND, MODULE, cls)
