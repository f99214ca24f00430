"""Load models and tokenizers: hub ids, local HF directories, or a model built from a recipe's `new:`.

One function per question, so the learner, the evaluator and later the rollout engines share them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from posttrain.errors import UserError
from posttrain.modeling import auto_model_class, new_model

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def check_model_dir(path: str | Path) -> None:
    """A path that looks local (`./`, `../`, `/`, or an existing directory) must be a Hugging Face model directory:
    say exactly what is wrong with it (a UserError), instead of transformers' hub-id, `model_type` or
    sentencepiece/tiktoken messages. Anything else is left to the hub."""
    text = str(path)
    local = Path(text)
    if not (text.startswith(("./", "../", "/")) or local.is_dir()):
        return
    if not local.exists():
        where = "" if local.is_absolute() else f" (relative to {Path.cwd()})"
        raise UserError(f"`{text}` does not exist{where}")
    if not local.is_dir():
        raise UserError(f"`{text}` is a file, not a Hugging Face model directory (a directory with config.json)")
    if not (local / "config.json").is_file():
        finals = sorted((d for d in [local / "final", *local.glob("*/final")] if (d / "config.json").is_file()),
                        key=lambda d: d.stat().st_mtime)  # the last stage's last
        hint = ("a run or stage directory: use " + " or ".join(f"`{d}`" for d in finals) if finals
                else "a run directory? use RUN/<stage>/final")
        raise UserError(f"`{text}` is a directory but holds no config.json (not a Hugging Face model directory; "
                        f"{hint})")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from `{path}`: {err}") from None
    if tok.pad_token is None:
        # Decoder-only tokenizers often ship without a pad token; padding is always masked out.
        tok.pad_token = tok.eos_token
    return tok


def model_config(path: str | Path, trust_remote_code: bool = False):
    """The transformers config at `path` (a UserError naming the path when there is none)."""
    from transformers import AutoConfig

    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from `{path}`: {err}") from None


def load_causal_lm(path: str | Path, spec):
    """The generating model at `path` (`auto_model_class`) with the recipe's dtype/attention settings (`spec`:
    ModelSpec); `spec.freeze_vision` freezes a vision-language model's vision tower."""
    kwargs = {"dtype": torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    config = model_config(path, spec.trust_remote_code)
    vision = hasattr(config, "vision_config")
    try:
        model = auto_model_class(config).from_pretrained(str(path), config=config, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load a model from `{path}`: {err}") from None
    if vision and spec.freeze_vision:
        vision_tower(model).requires_grad_(False)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def vision_tower(model):
    """The vision encoder of a vision-language model (`model.model.visual` for Qwen2/2.5-VL)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if tower is None:
        raise UserError(f"{type(model).__name__} has no vision tower (`visual`) to freeze")
    return tower


def add_lora(model, lora):
    """Wrap `model` with peft LoRA adapters (`lora`: LoraSpec). On a vision-language model the adapters go
    on the language model only (the vision tower's linear layers are excluded) unless `lora.vision`."""
    from peft import LoraConfig, get_peft_model

    targets = lora.targets if lora.targets == "all-linear" else list(lora.targets)
    exclude = None if lora.vision or not hasattr(model.config, "vision_config") else r".*\bvisual\b.*"
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM",
        exclude_modules=exclude,
    )
    return get_peft_model(model, config)


def build_new_model(out_dir: Path, new) -> Path:
    """Build the recipe's `model.new` (NewModelSpec) into `out_dir` once; reuse it if already complete."""
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    for corpus in new.tokenizer_corpus:
        if not Path(corpus).is_file():
            raise UserError(f"model.new.tokenizer_corpus: file `{corpus}` not found")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    new_model(
        tmp,
        arch=new.arch,
        hidden=new.hidden,
        layers=new.layers,
        heads=new.heads,
        kv_heads=new.kv_heads,
        intermediate=new.intermediate,
        max_position=new.max_position,
        tokenizer_corpus=new.tokenizer_corpus,
        vocab_size=new.vocab_size,
        individual_digits=new.individual_digits,
        seed=new.seed,
    )
    tmp.rename(out_dir)
    return out_dir


def _inner_lm(model):
    """The transformers model inside DDP / DeepSpeed (`.module`) and peft (`get_base_model`) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def separable_head(model):
    """The LM head of `model` when its logits are just `head(final hidden state)` (a Linear, no logit soft-capping
    or scaling after it), else None: then only the full forward gives the right logits."""
    inner = _inner_lm(model)
    config = getattr(inner, "config", None)
    text = getattr(config, "text_config", None) or config
    if any(getattr(text, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    import torch

    return head if isinstance(head, torch.nn.Linear) else None


@contextlib.contextmanager
def hidden_states_as_logits(model):
    """Inside this block `model(...)` returns the final (normed) hidden states `[N, T, H]` in `.logits`: its
    output embedding is swapped for an identity, so the caller applies the head itself, in chunks
    (`ops.chunked_token_logprobs`). The forward still goes through every wrapper (DDP, DeepSpeed, peft), so
    their hooks run as usual. Yields the head (see `separable_head`)."""
    import torch

    inner = _inner_lm(model)
    head = separable_head(model)
    if head is None:
        raise ValueError("the model's logits are not a Linear head of its hidden states")
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)
