"""Log-probs without the full-vocabulary logits (`ops.chunked_token_logprobs`, `learner.policy_logprobs`): the
same values and gradients as the full computation, in fp32, to 1e-6."""

import pytest
import torch

from posttrain.algorithms.ops import chunked_token_logprobs, logit_chunk, token_logprobs


def _case(seed=0, n=4, t=9, h=16, v=70):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g))
    hidden = torch.randn(n, t, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    return head, hidden, targets, mask


class _ModuleHead(torch.nn.Linear):
    """Not a plain `nn.Linear` to `ops._fusable` (as a ZeRO-3 head is not): the activation-checkpointing path."""


def _heads(head):
    other = _ModuleHead(head.in_features, head.out_features, bias=False)
    other.weight = head.weight
    return {"fused": head, "checkpointed": other}


@pytest.mark.parametrize("path", ["fused", "checkpointed"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_computation(chunk, path):
    """Both chunked paths against the full computation in fp64 (the truth fp32 rounds): log-probs within 1e-6
    relative (they reach −30 here, where fp32's own spacing is 2e-6), entropy within 1e-6 on the fused path;
    the checkpointed path runs the full computation's fp32 ops and equals it to 1e-6 absolute."""
    head, hidden, targets, mask = _case()
    chunked_head = _heads(head)[path]
    logp, entropy = chunked_token_logprobs(hidden, chunked_head, targets, mask, temperature=0.7, chunk=chunk)
    z64 = hidden.double() @ head.weight.double().T / 0.7
    truth = z64.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z64, -1)
    truth_entropy = torch.logsumexp(z64, -1) - (torch.softmax(z64, -1) * z64).sum(-1)
    assert torch.all((logp.double() - truth * mask).abs() <= 1e-6 * truth.abs().clamp(min=1))
    if path == "fused":
        assert torch.allclose(entropy.double(), truth_entropy.detach() * mask, atol=1e-6)
    else:
        logits = head(hidden)
        full = token_logprobs(logits, targets, 0.7)
        z = logits.float() / 0.7
        full_entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
        assert torch.allclose(logp, full * mask, atol=1e-6)
        assert torch.allclose(entropy, full_entropy.detach() * mask, atol=1e-6)
    assert bool((logp[~mask] == 0).all()) and bool((entropy[~mask] == 0).all())
    weights = torch.randn(mask.shape)  # any loss that is a weighted sum of the log-probs
    (logp * weights).sum().backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    (token_logprobs(head(hidden), targets, 0.7) * mask * weights).sum().backward()
    # gradients sum over the vocabulary (and the head's over tokens) in another order: equal to fp32 rounding
    assert torch.allclose(g_hidden, hidden.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_head, head.weight.grad, rtol=1e-5, atol=1e-5)


def test_the_fused_head_handles_a_bias_and_half_precision():
    """`_FusedHeadLogprobs` with a biased head, and in bf16 (the head's matmul in bf16, the softmax in fp32,
    as `head(hidden).float()` does), against autograd through the same ops."""
    from posttrain.algorithms.ops import _FusedHeadLogprobs

    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        head = torch.nn.Linear(16, 70).to(dtype)
        hidden = torch.randn(12, 16, generator=g).to(dtype).requires_grad_()
        targets = torch.randint(0, 70, (12,), generator=g)
        weights = torch.randn(12, generator=g)
        logp, _ = _FusedHeadLogprobs.apply(hidden, head.weight, head.bias, targets, 0.9)
        (logp * weights).sum().backward()
        got = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
        for t in (hidden, head.weight, head.bias):
            t.grad = None
        want = token_logprobs(head(hidden), targets, 0.9)
        (want * weights).sum().backward()
        assert torch.allclose(logp, want, atol=tol)
        for a, t in zip(got, (hidden, head.weight, head.bias)):
            assert a.dtype == t.dtype and torch.allclose(a.float(), t.grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["fused", "checkpointed"])
def test_a_micro_batch_without_loss_tokens_still_backpropagates_zero(path):
    head, hidden, targets, _ = _case()
    logp, _ = chunked_token_logprobs(hidden, _heads(head)[path], targets, torch.zeros(targets.shape, dtype=torch.bool))
    logp.sum().backward()
    assert bool((hidden.grad == 0).all()) and bool((head.weight.grad == 0).all())


def test_chunk_size_bounds_one_chunk_of_fp32_logits_to_256_mib():
    assert logit_chunk(151_936) == 441 and logit_chunk(151_936) * 151_936 * 4 <= 256 * 2**20
    assert logit_chunk(10**9) == 1


def test_policy_logprobs_of_a_model_equal_its_full_logits_and_restore_the_head(tiny_lm_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from posttrain import learner
    from posttrain.learner import policy_logprobs
    from posttrain.models import separable_head

    monkeypatch.setattr(learner, "FULL_LOGITS_BUDGET", 0)  # take the chunked path on this tiny model
    calls = []
    monkeypatch.setattr(learner, "chunked_token_logprobs",
                        lambda *a, **k: calls.append(1) or chunked_token_logprobs(*a, **k))

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 10), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[:, 4:] = 1
    mask[2, 7:] = 0
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mask": mask}
    logp, _ = policy_logprobs(model, mb, 0.9)
    assert calls == [1]
    logp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear) and separable_head(model) is not None
    full = token_logprobs(model(input_ids=ids, attention_mask=mb["attention_mask"]).logits[:, :-1], ids[:, 1:], 0.9)
    assert torch.allclose(logp, full * mask, atol=1e-6)
    (full * mask).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("chunked", [False, True])
def test_padding_free_log_probs_and_the_rl_loss_gradients_equal_the_padded_ones(tiny_lm_dir, monkeypatch, chunked):
    """`args.padding_free`: rows of different lengths (an RL micro-batch: right-padded after `collate_rl`) are
    packed into fewer rows with restarting position ids; the log-probs, entropy, GRPO loss and every
    parameter's gradient equal the padded computation to fp32 rounding, on the full-logits and chunked paths."""
    from transformers import AutoModelForCausalLM

    from posttrain import learner
    from posttrain.algorithms import grpo
    from posttrain.learner import packed_inputs, policy_logprobs
    from posttrain.stages.rl import collate_rl, rl_loss

    if chunked:
        monkeypatch.setattr(learner, "FULL_LOGITS_BUDGET", 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    g = torch.Generator().manual_seed(1)
    rows = []
    for k, (prompt, completion) in enumerate([(5, 3), (4, 9), (6, 2), (3, 1), (7, 6), (2, 4)]):
        ids = torch.randint(1, 64, (prompt + completion,), generator=g).tolist()
        rows.append({"input_ids": ids, "mask": [0] * prompt + [1] * completion, "credit": {"adv": float(k % 3 - 1)},
                     "truncated": False, "rollout_logp": None, "media": None})
    mb = collate_rl(rows, pad_id=0)
    inputs, where = packed_inputs(mb)
    assert inputs["input_ids"].shape[0] < len(rows)  # 6 rows of width 13 fit in 4
    assert int((inputs["input_ids"] != 0).sum()) == sum(len(r["input_ids"]) for r in rows)

    padded = policy_logprobs(model, mb, 0.8)
    packed = policy_logprobs(model, mb, 0.8, padding_free=True)
    for a, b in zip(padded, packed):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()

    args = grpo.Args()
    grads = []
    for padding_free in (False, True):
        model.zero_grad()
        result = rl_loss(model, mb, grpo, args, 0.8, padding_free=padding_free)
        (result.loss * result.mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5), name
