"""Tiny random-init causal LMs and byte-level BPE tokenizers, built fully offline.

Why this exists: tests, the quickstart and CI need a real Hugging Face model directory
(`config.json`, `model.safetensors`, `tokenizer.json`, a chat template) that every stage can load with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, without a hub download.
`new_model` trains a small tokenizer on local text, builds a random-init Qwen3 or Llama model sized to
it and saves both into one directory.

Token conventions (shared by the plain and the chat format so one eos id stops generation in both):

* `<|im_end|>` is the eos token. It ends an assistant turn in the chat template *and* is appended after
  the completion in the plain `prompt + completion + eos` format.
* `<|endoftext|>` is the pad token. It is never produced as a completion end, so masking pad positions
  can never hide a real eos.
* `<|im_start|>` opens a chat turn. There is no bos token.

Importing this module is cheap: torch, transformers and tokenizers are imported inside the functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from posttrain.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# Order fixes the ids: pad=0, <|im_start|>=1, eos=2.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

# ChatML. Each message renders as `<|im_start|>{role}\n{content}<|im_end|>\n`; the generation prompt is
# `<|im_start|>assistant\n`. Assistant content plus its `<|im_end|>` sits in a `{% generation %}` block so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens a model must learn
# to produce (including the eos that stops it), while the trailing newline stays unmarked like the prompt.
# Newlines are written as Jinja string escapes so the template has no layout-dependent whitespace.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

ARCHS = ("qwen3", "llama", "qwen2_5_vl")
VISION_ARCHS = ("qwen2_5_vl",)  # vision-language: a video/image tower in front of the language model


class ModelingError(UserError, ValueError):
    """Bad arguments for a tiny model or tokenizer.

    A `ValueError` for library callers, and a `UserError` so the CLI prints one line and exits 2.
    """


# --------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(
    corpus_files: Iterable[str | Path],
    vocab_size: int = 512,
    individual_digits: bool = True,
    min_frequency: int = 2,
    model_max_length: int | None = None,
    extra_special_tokens: tuple[str, ...] = (),
) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer on `corpus_files` and wrap it for transformers.

    * Byte-level with the full 256-symbol initial alphabet, so *any* text round-trips through
      encode/decode even if the corpus never contained it (no unk token needed).
    * With `individual_digits`, a `Digits` pre-tokenizer runs before `ByteLevel`, so every digit is its own
      token and BPE can never merge digits (or a space and a digit). Arithmetic tasks then see numbers
      digit by digit, which tiny models learn far more easily.
    * eos is `<|im_end|>` (ends both chat turns and plain completions), pad is `<|endoftext|>`, no bos.
    * Padding stays on the right (the transformers default); callers switch to left for generation.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    files = _check_corpus(corpus_files)
    specials = SPECIAL_TOKENS + tuple(extra_special_tokens)
    if vocab_size < 256 + len(specials):
        raise ModelingError(
            f"vocab_size={vocab_size} is too small: the byte alphabet (256) and {len(specials)} "
            f"special tokens need at least {256 + len(specials)}"
        )

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which return_assistant_tokens_mask relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return _wrap_tokenizer(tok, model_max_length, tuple(extra_special_tokens))


def _check_corpus(corpus_files: Iterable[str | Path]) -> list[Path]:
    """The corpus as a list of existing files; a clear error instead of a Rust panic otherwise."""
    files = [Path(f) for f in corpus_files]
    if not files:
        raise ModelingError("a tokenizer corpus is required: pass at least one text file")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelingError(f"tokenizer corpus file(s) not found: {', '.join(missing)}")
    return files


def _wrap_tokenizer(tok, model_max_length: int | None, extra: tuple[str, ...] = ()) -> "PreTrainedTokenizerFast":
    """Wrap a trained `tokenizers.Tokenizer` with our special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, *extra],
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# ------------------------------------------------------------------------------------------------- model


def default_intermediate(hidden: int) -> int:
    """MLP width when none is given: 3 * hidden rounded up to a multiple of 16 (SwiGLU-style ~8/3 ratio,
    kept a bit wider because tiny models are width-starved)."""
    return -(-3 * hidden // 16) * 16


def build_config(
    tokenizer: "PreTrainedTokenizerFast",
    *,
    arch: str = "qwen3",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position: int = 512,
    tie_embeddings: bool = True,
):
    """A `Qwen3Config` or `LlamaConfig` sized by the arguments, with ids taken from `tokenizer`.

    Token ids are always set explicitly: `LlamaConfig` otherwise defaults to bos=1 / eos=2, which would
    silently point at the wrong tokens of our vocabulary.
    """
    _check_shape(arch, hidden, heads, kv_heads)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or default_intermediate(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    if arch == "qwen2_5_vl":
        return _vision_config(tokenizer, common)
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _vision_config(tokenizer, text: dict):
    """A tiny Qwen2.5-VL: the text model of `text`, a 2-block vision tower (hidden 32) whose output width is the
    text hidden size, M-RoPE sections summing to head_dim / 2 (Qwen's 16:24:24 proportions)."""
    from transformers import Qwen2_5_VLConfig

    from posttrain.video import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

    half = text["head_dim"] // 2
    third = half * 3 // 8
    text = {k: v for k, v in text.items() if k != "head_dim"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0,
                               "mrope_section": [half - 2 * third, third, third]}
    vocab = tokenizer.get_vocab()
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
                       "fullatt_block_indexes": [1]},
        image_token_id=vocab[IMAGE_PAD], video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START], vision_end_token_id=vocab[VISION_END],
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def _check_shape(arch: str, hidden: int, heads: int, kv_heads: int) -> None:
    """Reject shapes the attention layers cannot build, before transformers fails with a shape error."""
    if arch not in ARCHS:
        raise ModelingError(f"unknown arch {arch!r} (valid: {', '.join(ARCHS)})")
    if hidden <= 0 or heads <= 0 or kv_heads <= 0:
        raise ModelingError("hidden, heads and kv_heads must be positive")
    if hidden % heads:
        raise ModelingError(f"hidden={hidden} must be divisible by heads={heads}")
    if heads % kv_heads:
        raise ModelingError(
            f"heads={heads} must be divisible by kv_heads={kv_heads} (grouped-query attention)"
        )


def auto_model_class(config):
    """`AutoModelForCausalLM`, or `AutoModelForImageTextToText` for a vision-language config (one with a
    `vision_config`, e.g. Qwen2.5-VL: transformers maps it only there)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM


def build_model(config, tokenizer: "PreTrainedTokenizerFast", seed: int = 0) -> "PreTrainedModel":
    """Random-init a causal LM from `config`, deterministically for a given `seed`.

    The generation config gets the tokenizer's eos/pad ids so `generate` stops at `<|im_end|>` and pads
    with `<|endoftext|>` without callers passing them.
    """
    import torch

    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config, dtype=torch.float32)
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: "torch.nn.Module", trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (embedding = lm_head) count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def new_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen3",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position: int = 512,
    tokenizer_corpus: Iterable[str | Path],
    vocab_size: int = 512,
    individual_digits: bool = True,
    seed: int = 0,
    tie_embeddings: bool = True,
) -> Path:
    """Train a tokenizer, random-init a model and save both into `out_dir`; return `out_dir`.

    The same arguments and corpus give byte-identical weights and tokenizer files, so a tiny model can be
    rebuilt instead of checked in.
    """
    out, _, _ = _new_model(
        out_dir,
        arch=arch,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_position=max_position,
        tie_embeddings=tie_embeddings,
        tokenizer_corpus=tokenizer_corpus,
        vocab_size=vocab_size,
        individual_digits=individual_digits,
        seed=seed,
    )
    return out


def _new_model(out_dir, *, tokenizer_corpus, vocab_size, individual_digits, seed, **shape):
    """`new_model` that also hands back the built model and tokenizer (for the CLI summary line)."""
    _check_shape(shape["arch"], shape["hidden"], shape["heads"], shape["kv_heads"])
    from posttrain import video

    vision = shape["arch"] in VISION_ARCHS
    tokenizer = build_tokenizer(
        tokenizer_corpus,
        vocab_size=vocab_size,
        individual_digits=individual_digits,
        model_max_length=shape["max_position"],
        extra_special_tokens=(video.VISION_START, video.VISION_END, video.VIDEO_PAD, video.IMAGE_PAD) if vision else (),
    )
    config = build_config(tokenizer, **shape)
    model = build_model(config, tokenizer, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if vision:  # tiny frames: 28×28 to 56×56 pixels, i.e. 1 to 4 vision tokens per temporal patch
        video.VisionProcessor(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(out)
    return out, model, tokenizer


# --------------------------------------------------------------------------------------------------- CLI


def add_new_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the `new-model` flags on `parser` (defaults match `new_model`)."""
    parser.add_argument("out_dir", type=Path, help="directory to write the model and tokenizer into")
    parser.add_argument("--arch", choices=ARCHS, default="qwen3", help="model family (default: qwen3)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default: 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: 2)")
    parser.add_argument(
        "--intermediate", type=int, default=None, help="MLP width (default: 3*hidden rounded up to 16)"
    )
    parser.add_argument("--max-position", type=int, default=512, help="max sequence length (default: 512)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size cap (default: 512)")
    parser.add_argument(
        "--tokenizer-corpus",
        metavar="FILE",
        action="append",
        required=True,
        type=Path,
        help="text file to train the tokenizer on (repeatable)",
    )
    parser.add_argument(
        "--no-individual-digits",
        dest="individual_digits",
        action="store_false",
        help="let BPE merge digits (default: every digit is its own token)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (default: 0)")
    return parser


def run_new_model(ns: argparse.Namespace) -> int:
    """Build the model described by `ns` and print one summary line; return the exit code."""
    out, model, tokenizer = _new_model(
        ns.out_dir,
        arch=ns.arch,
        hidden=ns.hidden,
        layers=ns.layers,
        heads=ns.heads,
        kv_heads=ns.kv_heads,
        intermediate=ns.intermediate,
        max_position=ns.max_position,
        tokenizer_corpus=ns.tokenizer_corpus,
        vocab_size=ns.vocab_size,
        individual_digits=ns.individual_digits,
        seed=ns.seed,
        tie_embeddings=True,
    )
    print(f"{out}  arch={ns.arch}  params={count_parameters(model):,}  vocab={len(tokenizer)}")
    return 0
