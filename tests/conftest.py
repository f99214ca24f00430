import os

import pytest

# Tiny models train fastest single-threaded on small CPUs (and tests then do not fight over cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import posttrain.stages  # noqa: E402,F401  (registers the stage kinds: tests load recipes as the CLI does)


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


@pytest.fixture(scope="session")
def grounding_data(tmp_path_factory):
    """The synthetic grounding task, small: 6 train / 2 test videos (2 queries each), 8 s at 2 fps, 28×28."""
    pytest.importorskip("av")
    from posttrain.tasks.grounding import write

    path = tmp_path_factory.mktemp("grounding")
    write(path, n_train=6, n_test=2, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_vlm_dir(grounding_data, tmp_path_factory):
    """A random-init tiny Qwen2.5-VL (text hidden 32, 2 layers, vision depth 2) with its tokenizer and
    preprocessor_config.json, built like the video quickstart's."""
    from posttrain.modeling import new_model

    path = tmp_path_factory.mktemp("tiny-vlm")
    new_model(path, arch="qwen2_5_vl", hidden=32, layers=2, heads=2, kv_heads=1, max_position=128,
              tokenizer_corpus=[grounding_data / "corpus.txt"], vocab_size=300)
    return path


@pytest.fixture(scope="session")
def vllm_quickstart_run(tmp_path_factory):
    """The quickstart pipeline (hidden-128 variant) with `engine: vllm`, run once per session: the colocated
    learning test reads it, and its SFT stage is the start of the asynchronous server run (test_vllm_server)."""
    from helpers import train_quickstart_vllm

    run_dir = tmp_path_factory.mktemp("vllm-quickstart") / "run"
    train_quickstart_vllm(run_dir, "stages.grpo.engine=vllm", "stages.grpo.vllm.kv_cache_memory_bytes=134217728")
    return run_dir
