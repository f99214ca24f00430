"""The rollout protocol and its HF `generate` backend, on a tiny offline model.

The central check is `test_sampler_logprobs_match_teacher_forcing`: the log-probs the sampler reports must be
what the learner recomputes (`token_logprobs(logits / T)` on prompt + completion, unpadded), for prompts of
different lengths left-padded into one batch. That catches position-id / padding bugs and any mismatch in the
log-prob definition (temperature, top-k/top-p truncation) between sampler and learner.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (tiny models: threads only hurt)

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.ops import token_logprobs
from posttrain.errors import UserError
from posttrain.modeling import new_model
from posttrain.rollout import Completion, RolloutEngine, RolloutError, SamplingParams, make_engine
from posttrain.rollout.hf import HFEngine

CORPUS = (
    "12+7*3=33\n45-6=39\n100/4=25\n8*9=72\n3+4=7\n99-11=88\n250+750=1000\n"
    "The quick brown fox jumps over the lazy dog.\n"
    "Hello world, hello there.\n"
    "A small model learns arithmetic one digit at a time.\n"
) * 10

# Different lengths on purpose: batched together they need left padding.
PROMPTS = ["3+4=", "The quick brown fox", "Hello", "12+7*3=33\n45-6="]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollout")
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return new_model(tmp / "tiny", hidden=32, layers=2, heads=4, kv_heads=2, tokenizer_corpus=[corpus], vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.fixture
def engine(model, tokenizer):
    return HFEngine(model, tokenizer, batch_size=64)


def teacher_forced(model, prompt_ids, token_ids, temperature):
    """What the learner computes: log softmax(logits / T) of each generated token, unpadded, one forward."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    p = len(prompt_ids)
    return token_logprobs(logits[:, p - 1 : -1], ids[:, p:], temperature)[0]


def test_shapes_and_order(engine, tokenizer):
    prompts = PROMPTS[:3]
    out = engine.generate(prompts, SamplingParams(n=3, max_tokens=6, seed=0))
    assert len(out) == len(prompts)
    for i, group in enumerate(out):
        assert len(group) == 3
        for c in group:
            assert isinstance(c, Completion)
            assert c.prompt_index == i
            assert 1 <= len(c.token_ids) <= 6
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # Token-id prompts and string prompts are the same prompt.
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    again = engine.generate(ids, SamplingParams(n=3, max_tokens=6, seed=0))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]
    assert engine.generate([], SamplingParams()) == []


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=1),
        SamplingParams(n=2, temperature=0.7, max_tokens=10, seed=2),
        # Truncation changes what is sampled, never the reported log-prob's definition.
        SamplingParams(n=2, temperature=0.7, top_k=20, top_p=0.9, max_tokens=10, seed=3),
        SamplingParams(n=1, temperature=0.0, max_tokens=10),  # greedy: log-probs at T = 1
    ],
    ids=["t1", "t0.7", "t0.7-topk-topp", "greedy"],
)
def test_sampler_logprobs_match_teacher_forcing(engine, model, tokenizer, sampling):
    out = engine.generate(PROMPTS, sampling)  # all rows in one left-padded batch
    temperature = sampling.temperature or 1.0
    checked = 0
    for prompt, group in zip(PROMPTS, out):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for c in group:
            expected = teacher_forced(model, prompt_ids, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
            checked += len(c.token_ids)
    assert checked >= 3 * len(PROMPTS)


@pytest.mark.parametrize("knobs", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)], ids=["t1", "warped"])
def test_first_token_frequencies_match_the_processed_distribution(model, tokenizer, knobs):
    """The engine draws from softmax(temperature → top-k → top-p of the logits): 20,000 one-token samples of a
    prompt, each token's frequency within 5 binomial standard errors of its probability, truncated tokens never."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    prompt = tokenizer("3+4=", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1].float()
    warped = TemperatureLogitsWarper(knobs["temperature"])(None, logits)
    if "top_k" in knobs:
        warped = TopPLogitsWarper(knobs["top_p"])(None, TopKLogitsWarper(knobs["top_k"])(None, warped))
    probs = torch.softmax(warped, -1)[0].double()

    n = 20_000
    (group,) = HFEngine(model, tokenizer, batch_size=n).generate([prompt], SamplingParams(n=n, max_tokens=1, seed=0, **knobs))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in group]), minlength=probs.numel()).double()
    stderr = (probs * (1 - probs) / n).sqrt()
    assert torch.all((counts / n - probs).abs() <= 5 * stderr + 1e-12)
    assert counts[probs == 0].sum() == 0
    kept = int((probs > 0).sum())
    assert 1 < kept <= 20 if "top_k" in knobs else kept == probs.numel()  # the truncation had work to do


def test_greedy_is_padding_invariant(model, tokenizer):
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    batched = HFEngine(model, tokenizer, batch_size=64).generate(PROMPTS, greedy)
    one_by_one = HFEngine(model, tokenizer, batch_size=1).generate(PROMPTS, greedy)
    for a, b in zip(batched, one_by_one):
        assert a[0].token_ids == b[0].token_ids
        torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-4, rtol=0)


def test_seed_reproducibility(engine):
    def tokens(seed):
        out = engine.generate(PROMPTS[:2], SamplingParams(n=4, max_tokens=12, seed=seed))
        return [[c.token_ids for c in g] for g in out]

    state = torch.random.get_rng_state()
    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)
    # A seeded call leaves the caller's RNG exactly where it was.
    assert torch.equal(torch.random.get_rng_state(), state)


def test_checkpoint_generation_config_does_not_leak(model_dir, model, tokenizer):
    """Sampling is what `SamplingParams` says, whatever the checkpoint's generation_config.json ships."""
    from transformers import AutoModelForCausalLM

    clean = HFEngine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
    gen = model.generation_config
    gen.repetition_penalty, gen.top_k, gen.min_new_tokens, gen.no_repeat_ngram_size = 5.0, 1, 8, 1
    engine = HFEngine(model, tokenizer)
    for sampling in (SamplingParams(temperature=0.0, max_tokens=8), SamplingParams(n=3, max_tokens=8, seed=4)):
        got, want = engine.generate(PROMPTS, sampling), clean.generate(PROMPTS, sampling)
        assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    assert model.generation_config is gen and gen.repetition_penalty == 5.0  # restored


def test_max_tokens_gives_length(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=5))
    for (c,) in out:
        assert c.finish_reason == "length"
        assert len(c.token_ids) == 5 == len(c.logprobs)


def test_eos_gives_stop_with_eos_last(model, tokenizer):
    prompt = tokenizer("3+4=", add_special_tokens=False)["input_ids"]
    answer = tokenizer("7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seq = torch.tensor([prompt + answer])
    labels = seq.clone()
    labels[:, : len(prompt)] = -100
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = model(input_ids=seq, labels=labels).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.05

    engine = HFEngine(model, tokenizer)
    (c,), (d,) = engine.generate([prompt, "3+4="], SamplingParams(n=1, temperature=0.0, max_tokens=20))
    assert c.token_ids == answer  # stopped at eos, not 20 tokens
    assert c.token_ids[-1] == tokenizer.eos_token_id
    assert c.finish_reason == "stop"
    assert c.text == "7"  # eos is special: not in the text
    assert len(c.logprobs) == len(answer)
    assert d.token_ids == c.token_ids
    assert model.training  # restored after generation


def test_stop_strings_cut_text_and_tokens_consistently(engine, tokenizer):
    free = SamplingParams(n=4, max_tokens=16, seed=5)
    full = engine.generate(PROMPTS[:2], free)
    # A stop string that really occurs: two characters from the middle of one sample's text.
    text = next(c.text for g in full for c in g if len(c.text) >= 6)
    stop = text[3:5]
    cut = engine.generate(PROMPTS[:2], SamplingParams(n=4, max_tokens=16, seed=5, stop=(stop, "\x00never")))
    hits = 0
    for g_full, g_cut in zip(full, cut):
        for a, c in zip(g_full, g_cut):
            # Same seed, same batch: the stopped sample is a prefix of the free one.
            assert a.token_ids[: len(c.token_ids)] == c.token_ids
            assert c.logprobs == pytest.approx(a.logprobs[: len(c.token_ids)], abs=1e-5)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            if stop in a.text:
                hits += 1
                assert c.finish_reason == "stop"
                assert stop in c.text  # kept in the text
                # The shortest prefix whose text contains the stop string: nothing after it.
                assert stop not in tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
            else:
                assert c.token_ids == a.token_ids and c.finish_reason == a.finish_reason
    assert hits >= 1


def test_load_weights_copies_by_name(model_dir, model, tokenizer):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    engine = HFEngine(model, tokenizer)
    target = HFEngine(other, tokenizer).generate(PROMPTS, greedy)
    before = engine.generate(PROMPTS, greedy)
    assert [g[0].token_ids for g in before] != [g[0].token_ids for g in target]

    # Wrapper prefixes (DDP's `module.`) are stripped.
    engine.load_weights((f"module.{k}", v) for k, v in other.state_dict().items())
    after = engine.generate(PROMPTS, greedy)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in target]
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
        assert p.data_ptr() != q.data_ptr()  # copied, not aliased

    # Colocated: the engine's own tensors are skipped (no copy, nothing changes).
    ptrs = [p.data_ptr() for p in model.parameters()]
    engine.load_weights(model.named_parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs

    with pytest.raises(TypeError, match="named_parameters"):
        engine.load_weights(None)
    with pytest.raises(RolloutError, match="not a weight"):
        engine.load_weights([("nope.weight", torch.zeros(1))])
    name, p = next(iter(model.named_parameters()))
    with pytest.raises(RolloutError, match="shape"):
        engine.load_weights([(name, torch.zeros(p.shape[0] + 1))])


def test_make_engine(model, tokenizer):
    engine = make_engine("hf", model=model, tokenizer=tokenizer, batch_size=8)
    assert isinstance(engine, HFEngine)
    assert isinstance(engine, RolloutEngine)
    assert engine.batch_size == 8
    with pytest.raises(UserError, match="vllm"):
        make_engine("vlm")


def test_sleep_wake(engine):
    engine.sleep()
    with pytest.raises(RuntimeError, match="wake"):
        engine.generate(PROMPTS[:1], SamplingParams(max_tokens=2))
    engine.wake()
    assert len(engine.generate(PROMPTS[:1], SamplingParams(max_tokens=2))[0]) == 1


def test_sampling_params_validation():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    for bad in ({"n": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_tokens": 0}, {"stop": ("",)}):
        with pytest.raises(RolloutError):
            SamplingParams(**bad)


def test_empty_prompt_is_rejected(engine):
    with pytest.raises(RolloutError, match="empty"):
        engine.generate([[]], SamplingParams())


def test_import_is_cheap():
    code = "import sys, posttrain.rollout; print(any(m in sys.modules for m in ('torch', 'transformers', 'vllm')))"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"
