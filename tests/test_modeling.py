"""Tiny offline models and tokenizers from `posttrain.modeling`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import modeling
from posttrain.modeling import (
    CHAT_TEMPLATE,
    ModelingError,
    add_new_model_arguments,
    build_tokenizer,
    count_parameters,
    new_model,
    run_new_model,
)

CORPUS = (
    "12+7*3=33\n45-6=39\n100/4=25\n8*9=72\n3+4=7\n99-11=88\n250+750=1000\n"
    "The quick brown fox jumps over the lazy dog.\n"
    "Hello world, hello there.\n"
    "A small model learns arithmetic one digit at a time.\n"
) * 10


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """Everything here must work without the hub; module scope so the shared fixtures run offline too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU OpenMP spinning makes each step
    ~50x slower (measured: 60 Adam steps 24 s with 2 threads beside another job, 0.3 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):
    return new_model(tmp_path_factory.mktemp("tiny") / "qwen3", tokenizer_corpus=[corpus], seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_import_is_cheap():
    code = (
        "import sys, posttrain.modeling; "
        "print(any(m in sys.modules for m in ('torch', 'transformers', 'tokenizers')))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"


def test_saved_directory_loads_offline(model_dir, tokenizer, model):
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def test_special_tokens(tokenizer, model):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    assert tokenizer.padding_side == "right"
    # Plain encoding adds nothing: callers append eos themselves.
    assert tokenizer("12")["input_ids"] == tokenizer.convert_tokens_to_ids(["1", "2"])
    # Special tokens are atomic in text.
    ids = tokenizer("<|im_start|>x<|im_end|>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    # Model and generation config agree with the tokenizer.
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_every_digit_is_its_own_token(tokenizer):
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    # Even numbers that are frequent in the corpus, and digits next to spaces, stay split.
    ids = tokenizer(" 1000 250+750")["input_ids"]
    digit_tokens = [t for t in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), digit_tokens


def test_digits_merge_without_individual_digits(corpus):
    tok = build_tokenizer([corpus], individual_digits=False)
    assert len(tok.tokenize("1000")) < 4


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "  leading and trailing  ",
        "tabs\tand\nnewlines\r\n",
        "héllo wörld ñ",
        "日本語 中文 한국어",
        "emoji 🤖🚀 ZWJ 👩‍👩‍👧",
        "\x00\x7f ctrl",
    ],
)
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_bpe_learned_merges(tokenizer):
    # The corpus words should compress below one token per character.
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tokenizer(text)["input_ids"]) < len(text)


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "12+3="},
        {"role": "assistant", "content": "15"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n12+3=<|im_end|>\n"
        "<|im_start|>assistant\n15<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n12+3=<|im_end|>\n<|im_start|>assistant\n"
    )


def test_assistant_tokens_mask_covers_content_and_eos(tokenizer):
    messages = [
        {"role": "user", "content": "12+3="},
        {"role": "assistant", "content": "15"},
        {"role": "user", "content": "2*4="},
        {"role": "assistant", "content": "8"},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = [tokenizer.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert marked == ["1", "5", "<|im_end|>", "8", "<|im_end|>"]


def test_same_seed_same_weights_and_tokenizer(tmp_path, corpus):
    from safetensors.torch import load_file

    a = new_model(tmp_path / "a", tokenizer_corpus=[corpus], seed=3)
    b = new_model(tmp_path / "b", tokenizer_corpus=[corpus], seed=3)
    c = new_model(tmp_path / "c", tokenizer_corpus=[corpus], seed=4)
    sa, sb, sc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(sa[k].equal(sb[k]) for k in sa)
    assert not all(sa[k].equal(sc[k]) for k in sa)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_both_archs_build_and_train(tmp_path, corpus, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = new_model(tmp_path / arch, arch=arch, tokenizer_corpus=[corpus])
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.config.head_dim == 16
    assert model.config.num_key_value_heads == 2
    assert model.config.bos_token_id is None  # LlamaConfig would otherwise default to bos=1, eos=2
    assert model.config.eos_token_id == tok.eos_token_id

    batch = tok(["12+7*3=33", "hi"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_count_is_tiny(model, tokenizer):
    n = count_parameters(model)
    print(f"hidden=64 layers=2 heads=4 kv_heads=2 vocab={len(tokenizer)}: {n:,} parameters")
    assert 50_000 < n < 500_000
    # Tied embeddings count once.
    assert n == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(model, trainable_only=True) == n


def test_generate_stops_at_eos(model, tokenizer):
    """Overfit one example so greedy decoding must emit eos, then check generate stops right there."""
    import torch

    prompt = tokenizer("12+3=", return_tensors="pt")["input_ids"]
    target = tokenizer("12+3=15", return_tensors="pt")["input_ids"]
    seq = torch.cat([target, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
    labels = seq.clone()
    labels[:, : prompt.shape[1]] = -100

    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = model(input_ids=seq, labels=labels).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.05

    model.eval()
    max_new = 20
    out = model.generate(prompt, max_new_tokens=max_new, do_sample=False)
    new = out[0, prompt.shape[1] :].tolist()
    assert new == tokenizer("15")["input_ids"] + [tokenizer.eos_token_id]  # stopped, not 20 tokens


def test_unknown_arch_is_rejected(tmp_path, corpus):
    with pytest.raises(ValueError, match="qwen3, llama"):
        new_model(tmp_path / "x", arch="gpt2", tokenizer_corpus=[corpus])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden": 60, "heads": 8}, "divisible by heads"),
        ({"heads": 4, "kv_heads": 3}, "divisible by kv_heads"),
        ({"vocab_size": 100}, "too small"),
    ],
)
def test_bad_shapes_are_user_errors(tmp_path, corpus, kwargs, match):
    with pytest.raises(ModelingError, match=match):
        new_model(tmp_path / "x", tokenizer_corpus=[corpus], **kwargs)


def test_missing_corpus_is_a_user_error(tmp_path):
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="not found"):
        build_tokenizer([tmp_path / "nope.txt"])
    with pytest.raises(UserError, match="required"):
        build_tokenizer([])


def test_cli_arguments_and_summary_line(tmp_path, corpus, capsys):
    parser = add_new_model_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(
        [str(tmp_path / "cli"), "--arch", "llama", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
         "--tokenizer-corpus", str(corpus), "--tokenizer-corpus", str(corpus), "--no-individual-digits",
         "--seed", "7"]
    )
    assert ns.individual_digits is False and ns.kv_heads == 1 and len(ns.tokenizer_corpus) == 2
    assert run_new_model(ns) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert str(tmp_path / "cli") in line and "arch=llama" in line and "params=" in line and "vocab=" in line
    assert (tmp_path / "cli" / "model.safetensors").is_file()

    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "y")])  # --tokenizer-corpus is required


def test_default_intermediate():
    assert modeling.default_intermediate(64) == 192
    assert modeling.default_intermediate(50) == 160
