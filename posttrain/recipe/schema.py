"""The recipe schema: every key a recipe may hold, its type, range and default (defined once, here).

Unknown keys are errors (`extra="forbid"`). A stage's `args` are a flat mapping validated against
`TrainArgs` (the learner/loop settings every stage shares) merged with the stage algorithm's own `Args`
dataclass; see `stage_args_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from posttrain.recipe.scoring import JudgeSpec, RewardSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewModelSpec(Strict):
    """A random-init model and a byte-level BPE tokenizer built from a corpus (see `posttrain new-model`)."""

    arch: Literal["qwen3", "llama", "qwen2_5_vl"] = "qwen3"  # qwen2_5_vl: a tiny vision-language model
    hidden: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int = Field(2, gt=0)
    intermediate: int | None = Field(None, gt=0)
    max_position: int = Field(512, gt=0)
    vocab_size: int = Field(512, gt=0)
    tokenizer_corpus: list[str] = Field(min_length=1)
    individual_digits: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) "
                f"and heads by kv_heads ({self.kv_heads})"
            )
        return self


class LoraSpec(Strict):
    """LoRA adapters through peft; the stage's final checkpoint is exported merged."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | Literal["all-linear"] = "all-linear"
    vision: bool = False  # vision-language models: adapters on the vision tower too (default: language model only)


class ModelSpec(Strict):
    """Where the starting weights come from: a hub id or local HF directory (`path`), or built (`new`)."""

    path: str | None = None
    new: NewModelSpec | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSpec | None = None
    freeze_vision: bool = False  # vision-language models: train the language model only

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.new is None):
            raise ValueError("give exactly one of `path` (hub id or local dir) or `new` (build a model)")
        return self


class VideoSpec(Strict):
    """Rows with a video (vision-language models): which column names it, where the files are, how to sample.
    The prompt gets the video first (`<|vision_start|><|video_pad|><|vision_end|>`), then its text."""

    column: str = "video"  # a path, or a name/id looked up in `dir` (extensions tried: .mp4 .mkv .webm .avi .mov)
    dir: str | None = None  # the video directory (relative names in `column` are joined to it)
    fps: float = Field(2.0, gt=0)  # frames sampled per second
    max_frames: int = Field(32, gt=0)  # frame cap (long videos are sampled sparser)
    min_frames: int = Field(4, gt=0)
    max_pixels: int | None = Field(None, gt=0)  # per frame; default: the model's preprocessor_config.json
    min_pixels: int | None = Field(None, gt=0)
    cache: int = Field(256, gt=0)  # processed videos kept in memory (the samples of one prompt share one)


class DataSpec(Strict):
    """A dataset through `datasets`: a hub id, a local file (json/jsonl/parquet/csv) or a local directory."""

    path: str
    format: Literal["auto", "charades", "activitynet", "qvhighlights"] = "auto"  # grounding annotation files
    name: str | None = None
    split: str = "train"
    validation: str | None = None  # a split name of the same dataset, or a path to a local file
    validation_size: float | int | None = Field(None, gt=0)  # held out of `split` when `validation` is unset
    rename: dict[str, str] = {}  # old column name -> new, e.g. {solution: answer} for verifiers reading `answer`
    prompt_column: str = "prompt"
    # a format string over the row's columns that builds the prompt (e.g. `When does "{query}" happen?`); a list:
    # every row once per template (TempSamp-R1's hybrid CoT / direct-answer prompts)
    prompt_template: str | list[str] | None = None
    completion_column: str = "completion"
    messages_column: str = "messages"
    template: Literal["chat", "plain"] = "chat"
    system_prompt: str | None = None
    max_length: int = Field(1024, gt=1)
    packing: bool = False
    limit: int | None = Field(None, gt=0)
    video: VideoSpec | None = None
    # a row that cannot be used (a line that is not UTF-8 or not JSON, a null or missing prompt/completion):
    # `error` stops with the file and row; `skip` leaves it out, counts it (warning, `data/skipped_rows`)
    bad_rows: Literal["error", "skip"] = "error"


class TrainArgs(Strict):
    """Learner and loop settings shared by every stage (flat inside a stage's `args`)."""

    lr: float = Field(1e-5, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    # adamw: torch's default implementation; adamw_fused: its fused kernel (5x faster steps at 25M parameters on
    # our 2-core CPU; the default of transformers' Trainer and so of TRL). Other rounding: see README "GRPO step"
    optimizer: Literal["adamw", "adamw_fused"] = "adamw"
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(32, gt=0)  # sequences per optimizer step, all processes together
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward pass on one process
    steps: int | None = Field(None, gt=0)  # optimizer steps; default: `epochs` over the data
    epochs: float = Field(1.0, gt=0)
    save_every: int = Field(0, ge=0)  # checkpoint every N steps (0: only the final one)
    keep_last: int = Field(2, gt=0)  # intermediate checkpoints kept on disk
    eval_every: int = Field(0, ge=0)  # validation loss every N steps (0: only at the end)
    log_every: int = Field(1, gt=0)


class RLArgs(TrainArgs):
    """TrainArgs plus the rollout settings every RL stage shares (flat inside `args`).

    One RL step samples `group_size` completions for each of `prompts_per_step` prompts (N = B·G rows),
    then takes `ppo_epochs × N / batch_size` optimizer steps on them. `steps` counts RL steps.
    """

    prompts_per_step: int = Field(16, gt=0)  # B, all processes together
    group_size: int = Field(8, gt=0)  # G completions per prompt
    temperature: float = Field(1.0, ge=0)  # 0: greedy; the learner divides logits by it too
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    max_tokens: int = Field(256, gt=0)  # generation budget per completion
    stop: list[str] = []
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups and sample more prompts to refill
    max_sampling_rounds: int = Field(4, gt=0)  # cap on sampling rounds per step with dynamic sampling
    batch_size: int | None = Field(None, gt=0)  # sequences per optimizer step; default: all N rows
    # rows (prompt × sample) per `generate` call of the hf engine; default: all of the step's rows on this
    # process in one call (fewer: less memory for the KV cache). The vllm engine takes a step in one call.
    generation_batch_size: int | None = Field(None, gt=0)
    # asynchronous RL (`engine: vllm_server`): the servers generate step t+k's batch while the learner trains
    # on step t, so a batch is at most k weight versions old (its sampler log-probs correct it: needs tis_cap).
    # 0: synchronous, every batch from the current weights
    async_steps: int = Field(0, ge=0)
    # run the model on the rows packed without padding (position ids restart per row): the same loss and
    # gradients to fp32 rounding, less compute when lengths vary (README "The GRPO step"); text data only
    padding_free: bool = False


def geometry_problems(t: TrainArgs, processes: int) -> list[str]:
    """Why a stage's batch sizes cannot be split over `processes` (empty when they can), each with the nearest
    values that would work (a micro_batch_size that divides the batch first: it keeps the training the same)."""
    problems = []
    batch, rows, micro = t.batch_size, None, t.micro_batch_size
    per_step = micro * processes
    named = f"batch_size {batch}"
    if isinstance(t, RLArgs):
        rows = t.prompts_per_step * t.group_size
        batch = t.batch_size or rows
        named = f"batch_size {batch}" + ("" if t.batch_size else " (the default: all rows)")
        if t.prompts_per_step % processes:
            fits = _nearest(t.prompts_per_step, lambda b: b % processes == 0, t.prompts_per_step + processes)
            problems.append(f"prompts_per_step {t.prompts_per_step} is not a multiple of {processes} processes; "
                            f"use prompts_per_step {_either(fits)}")
    # a valid batch size: whole micro-batches on every process and (RL) a divisor of the step's rows
    if rows is None:
        batch_ok, batch_hi = (lambda b: b % per_step == 0), batch + per_step
    else:
        batch_ok, batch_hi = (lambda b: rows % b == 0 and b % per_step == 0), rows
    batches = _nearest(batch, batch_ok, batch_hi)
    if rows is not None and rows % batch:
        if not batches:  # no micro-batch split works: at least name the divisors of the rows
            batches = _nearest(batch, lambda b: rows % b == 0, rows)
        problems.append(f"prompts_per_step {t.prompts_per_step} × group_size {t.group_size} = {rows} rows "
                        f"is not a multiple of batch_size {batch}; use batch_size {_either(batches)}")
        batches = []  # named once, above
    if batch % per_step:
        hints = []
        micros = _nearest(micro, lambda m: batch % (m * processes) == 0, batch // processes)
        if micros:
            hints.append(f"micro_batch_size {_either(micros)} (the same batch)")
        if batches:
            hints.append(f"batch_size {_either(batches)}")
        if not hints and rows is not None:
            hints.append("prompts_per_step × group_size rows that split over the processes")
        problems.append(
            f"{named} is not a multiple of micro_batch_size {micro} × {processes} processes = {per_step}"
            + (f"; use {', or '.join(hints)}" if hints else "")
        )
    return problems


def _nearest(value: int, ok, hi: int) -> list[int]:
    """The largest positive integer below `value` and the smallest one above it (up to `hi`) for which `ok`
    holds, whichever exist (never the same number twice)."""
    below = next((v for v in range(min(value - 1, hi), 0, -1) if ok(v)), None)
    above = next((v for v in range(value + 1, hi + 1) if ok(v)), None)
    return [v for v in (below, above) if v is not None]


def _either(values: list[int]) -> str:
    return " or ".join(str(v) for v in values)


class TrackingSpec(Strict):
    trackers: list[Literal["tensorboard", "wandb", "trackio"]] = []
    project: str | None = None  # tracker project name; default: the recipe name
    progress: bool = True


class EvalBenchmark(Strict):
    """One benchmark of a recipe's `eval:`: a spec (eval/<bench>.yaml or a spec file) with overrides, or a
    whole spec given inline under `spec` (e.g. a held-out split of the training data)."""

    bench: str | None = None  # a spec name in eval/ or the path of a spec .yaml
    spec: dict[str, Any] = {}  # spec keys merged over the file's (the whole spec when `bench` is unset)
    data: str | None = None  # the benchmark's data file (sets posttrain does not ship)
    limit: int | None = Field(None, gt=0)
    n: int | None = Field(None, gt=0)  # samples per problem
    k: list[int] | None = None  # pass@k / maj@k / avg@k
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _named(self):
        if self.bench is None and not self.spec:
            raise ValueError("give `bench` (a spec name or file) or an inline `spec`")
        return self


class EvalSpec(Strict):
    """Benchmarks measured before the first stage, after each stage and, with `every`, during each stage.
    Results go to eval.jsonl (per model), metrics.jsonl (`eval/<bench>/<metric>`) and the trackers."""

    benchmarks: list[EvalBenchmark] = Field(min_length=1)
    every: int = Field(0, ge=0)  # also every N steps inside each stage (0: only at stage ends)
    initial: bool = True  # evaluate the starting model too
    batch_size: int = Field(64, gt=0)  # rows per generate call


class VLLMSpec(Strict):
    """Settings of the vLLM rollout engine (`engine: vllm`); see posttrain/rollout/vllm.py."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # GPU share for weights + KV cache (colocated learner!)
    kv_cache_memory_bytes: int | None = Field(None, gt=0)  # a fixed KV-cache size instead (default 256 MiB on CPU)
    max_model_len: int | None = Field(None, gt=0)  # default: data.max_length + args.max_tokens
    enforce_eager: bool | None = None  # default: eager on CPU, CUDA graphs on GPUs
    sleep_level: Literal[1, 2] = 1  # sleep() around each update on GPUs: 1 keeps weights in CPU memory, 2 drops them
    sync_timeout: float = Field(300.0, gt=0)  # seconds a weight sync may take before the run stops with an error


class VLLMServerSpec(Strict):
    """Settings of `engine: vllm_server` (vLLM's own servers, on other GPUs or nodes); posttrain/rollout/server.py."""

    urls: list[str] = []  # running `vllm serve` servers (README); empty: posttrain starts one on this machine
    model: str | None = None  # what the servers were started with; default: the stage's starting model
    # the data plane of weight syncs. auto: nccl to `urls` on GPUs, ipc (CUDA IPC, same GPU) to a server posttrain
    # starts, posttrain_gloo (gloo over TCP) on CPUs
    weight_transfer: Literal["auto", "nccl", "ipc", "posttrain_gloo"] = "auto"
    transfer_address: str | None = None  # this machine's address the servers reach; default: the route to urls[0]
    transfer_port: int = Field(0, ge=0, le=65535)  # 0: a free port
    concurrency: int = Field(64, gt=0)  # generation requests in flight per trainer process
    request_timeout: float = Field(600.0, gt=0)  # seconds one generation request may take
    retry_seconds: float = Field(120.0, gt=0)  # a server that does not answer is retried this long, then the run stops
    start_timeout: float = Field(600.0, gt=0)  # seconds to wait for the servers at the start of a stage
    sync_timeout: float = Field(300.0, gt=0)  # seconds a weight sync may take before the run stops with an error
    max_model_len: int | None = Field(None, gt=0)  # default: data.max_length + args.max_tokens
    serve_args: list[str] = []  # extra `vllm serve` flags for a server posttrain starts, e.g. ["--tensor-parallel-size", "2"]
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # a server posttrain starts on this machine's GPU


class PrivilegedSpec(Strict):
    """Distillation stages: the dataset column with the privileged information I (a hint, a worked solution,
    expert actions) and how the teacher's prompt shows it: `template` with `{prompt}` and `{privileged}`."""

    column: str
    template: str = "{prompt}\n\nHint: {privileged}"

    @model_validator(mode="after")
    def _placeholders(self):
        for name in ("{prompt}", "{privileged}"):
            if name not in self.template:
                raise ValueError(f"template must contain {name}, got {self.template!r}")
        return self


class SynthesizerSpec(Strict):
    """TTCS stages: the synthesizer policy. `template` renders its prompt from one test question
    (`{question}`); `args` are its own learner and rollout settings (flat, like a stage's `args`)."""

    template: str = (
        "Write one new problem that has the same structure and solution method as the problem below but "
        "different surface details (numbers, names, objects). Put only the new problem inside "
        "<question></question> tags.\n\nProblem: {question}"
    )
    args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _placeholder(self):
        if "{question}" not in self.template:
            raise ValueError(f"template must contain {{question}}, got {self.template!r}")
        return self


class ScorerSpec(Strict):
    """How a stage runs its verifiers (`posttrain.reward.Scorer`)."""

    workers: int = Field(2, ge=0)  # verifier worker processes (0: in-process, no timeouts: debugging only)
    memory_mb: int | None = Field(None, gt=0)  # address-space cap per worker: a blow-up fails its row, not the box


class StageSpec(Strict):
    kind: str | None = None  # the stage kind; default: the stage's name
    data: DataSpec
    args: dict[str, Any] = {}
    rewards: list[RewardSpec] = []  # RL stages: verifiers by name or module:function, with weights (spo: logged only)
    judge: JudgeSpec | None = None  # spo stages: the pairwise judge whose win rates are the rewards (judges.py)
    privileged: PrivilegedSpec | None = None  # distill stages: the privileged column and the teacher's prompt
    synthesizer: SynthesizerSpec | None = None  # ttcs stages: the synthesizer's prompt and settings
    scorer: ScorerSpec = ScorerSpec()  # RL stages: verifier worker processes and their memory cap
    # RL stages: the rollout engine: hf (transformers generate), vllm (in-process, colocated), vllm_server
    # (vLLM's own servers: other GPUs or nodes, asynchronous RL); README "Launching on many GPUs and nodes"
    engine: Literal["hf", "vllm", "vllm_server"] = "hf"
    vllm: VLLMSpec = VLLMSpec()  # settings of `engine: vllm`
    vllm_server: VLLMServerSpec = VLLMServerSpec()  # settings of `engine: vllm_server`


class Recipe(Strict):
    name: str
    seed: int = 0
    run_dir: str | None = None  # default: runs/<name>
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision of the learner
    model: ModelSpec
    tracking: TrackingSpec = TrackingSpec()
    eval: EvalSpec | None = None
    stages: dict[str, StageSpec] = Field(min_length=1)


# --------------------------------------------------------------------------------------------------------
# A stage's `args`: TrainArgs + the algorithm's Args dataclass, flattened into one strict pydantic model.


def _field_from_dataclass(f: dataclasses.Field, hint) -> tuple[Any, Any]:
    """Turn a dataclass field into a pydantic (type, Field) pair; ranges come from `field(metadata=...)`."""
    meta = dict(f.metadata)
    doc = meta.pop("doc", None)
    default = f.default if f.default is not dataclasses.MISSING else ...
    return hint, Field(default, description=doc, **meta)


@functools.cache
def stage_args_model(kind: str, algo_args: type, rl: bool = False) -> type[BaseModel]:
    """A strict model for `stages.<name>.args` of a stage of `kind` whose algorithm uses `algo_args`:
    the shared `TrainArgs` (or `RLArgs` for RL stages) plus the algorithm's fields."""
    base = RLArgs if rl else TrainArgs
    hints = typing.get_type_hints(algo_args)
    fields = {f.name: _field_from_dataclass(f, hints[f.name]) for f in dataclasses.fields(algo_args)}
    clash = set(fields) & set(base.model_fields)
    assert not clash, f"{algo_args.__qualname__} redefines shared args {clash}"
    return create_model(f"{kind.capitalize()}StageArgs", __base__=base, **fields)


def split_args(validated: BaseModel, algo_args: type, rl: bool = False) -> tuple[TrainArgs, Any]:
    """Split a validated flat args model into (TrainArgs or RLArgs, the algorithm's Args instance)."""
    values = validated.model_dump()
    algo_names = {f.name for f in dataclasses.fields(algo_args)}
    base = RLArgs if rl else TrainArgs
    train = base(**{k: v for k, v in values.items() if k not in algo_names})
    return train, algo_args(**{k: v for k, v in values.items() if k in algo_names})
