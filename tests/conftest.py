import os

import pytest

# Tiny models train fastest single-threaded on small CPUs (and tests then do not fight over cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A random-init 2-layer Qwen3 (vocab 64), saved like any HF checkpoint; no tokenizer needed."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    path = tmp_path_factory.mktemp("tiny-lm")
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path
