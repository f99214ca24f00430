"""The learner: the only owner of the model, the optimizer and the learning-rate schedule.

One `train_step` serves every stage: the stage hands it the micro-batches of one optimizer step on this
process and a `loss_fn(model, micro_batch) -> LossOutput` (per-token losses); the learner counts the
loss tokens of the *whole* optimizer batch (all micro-batches, all processes) first, so the reduced loss
and its gradient do not depend on how the batch is split (`algorithms.ops.aggregate`).

Runs on Accelerate: plain/DDP and DeepSpeed ZeRO-1/2/3 through the same code (launch config decides).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from posttrain.algorithms.ops import aggregate, batch_totals, chunked_token_logprobs, token_logprobs
from posttrain.datatypes import BatchTotals, Reduction
from posttrain.models import add_lora, hidden_states_as_logits, load_causal_lm, separable_head
from posttrain.recipe.schema import ModelSpec, TrainArgs
from posttrain.video import forward_inputs


def new_accelerator(precision: str = "fp32", trackers: list[str] | None = None, project_dir=None):
    """An Accelerator for one run: `precision` fp32 | bf16 | fp16 (autocast), optional trackers."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A second run in the same Python process (notebooks, tests) may ask for another precision: forget the
    # previous run's settings but keep the process group (PartialState).
    AcceleratorState._reset_state()
    # Without CUDA, Accelerate quietly runs each launched process on its own (DistributedType.NO) unless
    # told `cpu=True`; then several processes form one gloo group (MULTI_CPU).
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(cpu=cpu, mixed_precision=mixed, log_with=trackers or None,
                       project_dir=str(project_dir) if project_dir else None)


def lr_at(step: int, train: TrainArgs, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine decay
    from `lr` down to `lr · min_lr_ratio` at the last step. A pure function of the step, so resuming needs
    no scheduler state."""
    warmup = train.warmup_steps or int(round(train.warmup_ratio * total_steps))
    if warmup and step < warmup:
        return train.lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return train.lr
    span = max(total_steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    shape = 1.0 - progress if train.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.lr * (train.min_lr_ratio + (1.0 - train.min_lr_ratio) * shape)


def adamw(groups, fused: bool = False, **settings) -> torch.optim.AdamW:
    """AdamW; `fused`: torch's fused kernel where it runs (CPU and CUDA, floating-point parameters), one kernel per
    step instead of a loop over tensors, 5x faster on a 25M-parameter model on our 2-core CPU, falling back to
    the default implementation where torch refuses it (e.g. a device without the kernel). Not the default: it
    rounds differently, and the shipped learning figures were measured with the default implementation."""
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **settings)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, **settings)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases), the usual AdamW practice."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Learner:
    def __init__(self, accelerator, model_spec: ModelSpec, train: TrainArgs, total_steps: int, init_path,
                 *, alongside: bool = False):
        """`alongside`: a second learner on the same Accelerator (TTCS's two policies); the first one's model and
        optimizer stay registered, so one `save_state` writes both and one `load_state` restores both."""
        self.accelerator = accelerator
        self.spec = model_spec
        self.train = train
        self.total_steps = total_steps
        self.step = 0
        self.init_path = init_path
        self.accumulation = train.batch_size // (train.micro_batch_size * accelerator.num_processes)
        model = load_causal_lm(init_path, model_spec)
        if model_spec.lora is not None:
            model = add_lora(model, model_spec.lora)
        optimizer = adamw(_param_groups(model, train.weight_decay), fused=train.optimizer == "adamw_fused",
                          lr=train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps)
        # One Accelerator serves the whole recipe: forget the previous stage's model and optimizer, or
        # save_state/load_state would number this stage's objects after them (model_1, optimizer_1).
        if not alongside:
            accelerator.free_memory()
        self._configure_deepspeed()
        accelerator.gradient_accumulation_steps = self.accumulation
        self.model, self.optimizer = accelerator.prepare(model, optimizer)

    # ------------------------------------------------------------------------------------------ setup

    @property
    def uses_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    def _configure_deepspeed(self) -> None:
        """The recipe, not the launch config, owns batch geometry and clipping: write them into DeepSpeed's."""
        if not self.uses_deepspeed:
            return
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = self.train.micro_batch_size
        config["gradient_accumulation_steps"] = self.accumulation
        config["train_batch_size"] = self.train.batch_size
        config["gradient_clipping"] = self.train.max_grad_norm or 0.0

    # ------------------------------------------------------------------------------------------- step

    def global_totals(self, micro_batches: list[dict]) -> BatchTotals:
        local = [batch_totals(mb["mask"]) for mb in micro_batches]
        counts = torch.tensor(
            [sum(t.tokens for t in local), sum(t.seqs for t in local)], dtype=torch.float64, device=self.device
        )
        counts = self.accelerator.reduce(counts, reduction="sum")
        return BatchTotals(tokens=float(counts[0]), seqs=float(counts[1]))

    @property
    def device(self):
        return self.accelerator.device

    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.train, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, micro_batches: list[dict], loss_fn, reduction: Reduction) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns metrics reduced over processes."""
        if len(micro_batches) != self.accumulation:
            raise ValueError(f"expected {self.accumulation} micro-batches per step, got {len(micro_batches)}")
        start = time.perf_counter()
        self.model.train()
        self.accelerator.gradient_accumulation_steps = self.accumulation  # learners may share the Accelerator
        totals = self.global_totals(micro_batches)
        lr = self._set_lr()
        # `aggregate` already divides by the global normaliser: undo DDP's mean over processes and
        # Accelerate's (or DeepSpeed's) division by the accumulation steps.
        scale = self.accelerator.num_processes * self.accumulation
        self.accelerator.step = 0  # align Accelerate's accumulation counter with our optimizer step
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}
        grad_norm = None
        for mb in micro_batches:
            with self.accelerator.accumulate(self.model):
                with self.accelerator.autocast():
                    out = loss_fn(self.model, mb)
                part = aggregate(out.loss, out.mask, reduction, totals)
                self.accelerator.backward(part * scale)
                loss_sum += part.detach().double()
                for name, value in out.metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().double()
                if self.accelerator.sync_gradients:
                    grad_norm = self._clip()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._step_metrics(loss_sum, metric_sums, totals, grad_norm, lr, time.perf_counter() - start)

    def _clip(self):
        max_norm = self.train.max_grad_norm if self.train.max_grad_norm else float("inf")
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def _step_metrics(self, loss_sum, metric_sums, totals, grad_norm, lr, seconds) -> dict[str, float]:
        names = sorted(metric_sums)
        stacked = torch.stack([loss_sum] + [torch.as_tensor(metric_sums[n], device=self.device) for n in names])
        stacked = self.accelerator.reduce(stacked.double(), reduction="sum")
        metrics = {"loss": float(stacked[0]), "lr": lr, "tokens": int(totals.tokens), "time/update": seconds}
        for i, name in enumerate(names, start=1):
            metrics[name] = float(stacked[i]) / max(totals.tokens, 1.0)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    @torch.no_grad()
    def forward_no_grad(self, micro_batches: list[dict], fn) -> list:
        """`fn(model, micro_batch)` for each micro-batch without gradients (e.g. `old_logp`)."""
        self.model.eval()
        out = []
        for mb in micro_batches:
            with self.accelerator.autocast():
                out.append(fn(self.model, mb))
        return out

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[dict], loss_fn, reduction: Reduction) -> float:
        """The reduced loss of a batch without a gradient step (e.g. validation loss)."""
        self.model.eval()
        totals = self.global_totals(micro_batches)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for mb in micro_batches:
            with self.accelerator.autocast():
                out = loss_fn(self.model, mb)
            total += aggregate(out.loss, out.mask, reduction, totals).double()
        return float(self.accelerator.reduce(total, reduction="sum"))

    # ------------------------------------------------------------------------------------ checkpoints

    def save_state(self, directory: Path) -> None:
        """Exact-resume state (weights in training precision, optimizer, RNG of every process). Every
        process must call this (DeepSpeed writes its shards)."""
        self.accelerator.save_state(str(directory), safe_serialization=True)

    def load_state(self, directory: Path, step: int) -> None:
        self.accelerator.load_state(str(directory))
        self.step = step

    def export_hf(self, directory: Path, tokenizer, merge_lora: bool) -> None:
        """Write a Hugging Face checkpoint (safetensors) that `AutoModelForCausalLM` loads. Every process
        must call this (ZeRO-3 gathers the weights); the main process writes. LoRA adapters are merged
        into the base weights when `merge_lora`, otherwise saved as a peft adapter."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        if merge_lora and self.spec.lora is not None:
            model = _merged_copy(model)
            state_dict = model.state_dict()
        model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(directory))
        if hasattr(model.config, "vision_config"):  # the video preprocessing settings travel with the weights
            import shutil

            from posttrain.video import processor_files

            for file in processor_files(self.init_path):
                shutil.copy(file, Path(directory) / file.name)

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)


def _merged_copy(peft_model):
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


FULL_LOGITS_BUDGET = 2**26  # fp32 numbers of full logits above which log-probs are computed in chunks


def head_for_chunks(model, positions: int):
    """The LM head when `[positions, vocab]` fp32 logits would exceed `FULL_LOGITS_BUDGET` and the head is
    separable (`models.separable_head`): the caller then applies it in chunks. None: take the full logits."""
    head = separable_head(model)
    return head if head is not None and positions * head.out_features > FULL_LOGITS_BUDGET else None


def packed_inputs(mb: dict) -> tuple[dict, torch.Tensor] | None:
    """A right-padded micro-batch without its padding: each row's tokens placed one after another into rows of
    the batch's width, `position_ids` restarting at 0 per row and no attention mask, so transformers masks
    attention block-diagonally (as for SFT packing, `data.pack`) and no row sees another. Returns the packed
    forward inputs and `where` `[N, L]`: for each original position its index in the flattened packed
    sequence, or R·L (one past the end) for padding. None when packing saves no row (or the batch has video:
    its 3-D positions are not restarted here)."""
    attention = mb.get("attention_mask")
    if attention is None or mb.get("pixel_values_videos") is not None:
        return None
    lengths = attention.sum(1).tolist()
    width = attention.shape[1]
    rows: list[list[int]] = []  # first-fit decreasing: the longest rows first, each into the first with room
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= width), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += lengths[i]
    if len(rows) == len(lengths):
        return None
    ids = mb["input_ids"]
    packed = torch.zeros((len(rows), width), dtype=ids.dtype, device=ids.device)
    positions = torch.zeros_like(packed)
    where = torch.full(ids.shape, len(rows) * width, dtype=torch.long, device=ids.device)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = lengths[i]
            packed[r, offset : offset + n] = ids[i, :n]
            positions[r, offset : offset + n] = torch.arange(n)
            where[i, :n] = r * width + offset + torch.arange(n, device=ids.device)
            offset += n
        positions[r, offset:] = torch.arange(width - offset)  # the tail is its own segment
    return {"input_ids": packed, "position_ids": positions, "use_cache": False}, where


def _unpacked(states: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Packed `[R, L, H]` states back in the padded layout `[N, L, H]` (zeros at padding); differentiable."""
    flat = states.reshape(-1, states.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
    return flat[where]


def policy_logprobs(model, mb: dict, temperature: float, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Learner log-probs of the target tokens and the policy's entropy, both `[n, L−1]`, logits divided by the
    sampling temperature, at the loss positions (`mb["mask"]`; 0 elsewhere). When the full `[n, L−1, V]` fp32
    logits would exceed `FULL_LOGITS_BUDGET` numbers (256 MiB) and the LM head is separable
    (`models.separable_head`), they never exist: the final hidden states of the loss positions go through the
    head in checkpointed chunks (`ops.chunked_token_logprobs`), which is what lets a 152k vocabulary fit.
    Below the budget (small vocabularies: chunking buys nothing there) and for soft-capped logits, the full
    forward's logits are used; both give the same values to fp32 rounding (tests/test_logprobs.py).
    `padding_free` (RL `args.padding_free`): the model body runs on the rows packed without padding
    (`packed_inputs`); values and gradients equal the padded computation to fp32 rounding."""
    targets, mask = mb["input_ids"][:, 1:], mb["mask"]
    head = separable_head(model)
    chunked = head_for_chunks(model, targets.numel()) is not None
    packing = packed_inputs(mb) if padding_free and head is not None else None
    if not chunked and packing is None:
        return _logprobs_and_entropy(model(**forward_inputs(model, mb)).logits[:, :-1], targets, mask, temperature)
    with hidden_states_as_logits(model) as head:
        if packing is None:
            hidden = model(**forward_inputs(model, mb)).logits[:, :-1]
        else:  # the body runs on the packed rows, the head on the padded layout's positions
            inputs, where = packing
            hidden = _unpacked(model(**inputs).logits, where)[:, :-1]
    if chunked:
        return chunked_token_logprobs(hidden, head, targets, mask, temperature)
    return _logprobs_and_entropy(head(hidden), targets, mask, temperature)


def _logprobs_and_entropy(logits, targets, mask, temperature):
    logp = token_logprobs(logits, targets, temperature) * mask
    with torch.no_grad():
        z = logits.float() / temperature
        entropy = (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)) * mask
    return logp, entropy
