"""Golden values for NFT (hand-derived in the comments; see ALGORITHMS.md and the nft module docstring)."""

import math

import pytest
import torch
from pydantic import ValidationError

from posttrain.algorithms import grpo, nft
from posttrain.algorithms.ops import aggregate, batch_totals
from posttrain.datatypes import Reduction
from posttrain.recipe.schema import split_args, stage_args_model

LN = math.log
TOKEN_SUM = Reduction("token-sum-norm", norm=1000.0)

# ---------------------------------------------------------------------------------------------------------
# Correct rate and ω


def test_correct_rate_golden():
    # groups of 4: 1/4, 2/4, all correct → clamp 0.98, all wrong → clamp 0.02
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    rate = nft.correct_rate(rewards, 4)
    assert rate.tolist() == pytest.approx([0.25] * 4 + [0.5] * 4 + [0.98] * 4 + [0.02] * 4)
    # 1 correct of 64 = 0.015625 < 0.02 → clamped even though the group is mixed
    rate = nft.correct_rate(torch.tensor([1.0] + [0.0] * 63), 64)
    assert rate.tolist() == pytest.approx([0.02] * 64)
    # custom clamp
    rate = nft.correct_rate([1, 1, 1, 1], 4, nft.Args(rate_max=0.9))
    assert rate.tolist() == pytest.approx([0.9] * 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        nft.correct_rate(torch.zeros(5), 2)


@pytest.mark.parametrize(
    "rate, w1, w2",
    [
        (0.25, 0.75, math.sqrt(3)),  # √(0.75/0.25) = √3 = 1.732051
        (0.5, 0.5, 1.0),
        (0.98, 0.02, math.sqrt(0.02 / 0.98)),  # 0.142857
        (0.02, 0.98, 7.0),  # √(0.98/0.02) = √49
    ],
)
def test_omega_golden(rate, w1, w2):
    assert nft.omega(torch.tensor(rate), 1).item() == pytest.approx(w1)
    assert nft.omega(torch.tensor(rate), 2).item() == pytest.approx(w2)
    with pytest.raises(ValueError):
        nft.omega(rate, 3)


def test_max_v_clips_value_passes_gradient():
    x = torch.tensor([0.5, 1.0, 2.0, -1.0e6], dtype=torch.float32, requires_grad=True)
    y = nft.max_v(x, 1.0)
    assert y.tolist() == [1.0, 1.0, 2.0, 1.0]  # exactly max(x, ε), also for |x| ≫ ε
    (g,) = torch.autograd.grad((y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum(), x)
    assert g.tolist() == [1.0, 2.0, 3.0, 4.0]  # ∂/∂x = 1 everywhere


# ---------------------------------------------------------------------------------------------------------
# Per-token values and gradients (single tokens, old_logp = 0 so R = exp(logp))


def _tokens(rewards, rate, log_ratios, args, **kw):
    """One token per row; returns (LossOutput, values, ∂loss/∂logp per token)."""
    logp = torch.tensor(log_ratios, dtype=torch.float64).view(-1, 1).requires_grad_()
    old = torch.zeros_like(logp)
    n = len(log_ratios)
    out = nft.policy_loss(logp, old, torch.tensor(rewards, dtype=torch.float64), torch.tensor(rate), torch.ones(n, 1),
                          args, **kw)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    return out, out.loss.view(-1).tolist(), grad.view(-1).tolist()


def test_on_policy_gradients_match_dr_grpo_advantages():
    # rewards [1,0,0,0]: r̂ = 0.25, ω = 0.75. Positive: ∂(−ω log R)/∂logp = −ω = −0.75.
    # Negative: ω · r̂/(1 − r̂) = 0.75 · 0.25/0.75 = +0.25. Values are 0 (log 1).
    rewards = [1.0, 0.0, 0.0, 0.0]
    rate = nft.correct_rate(rewards, 4)
    out, values, grads = _tokens(rewards, rate.tolist(), [0.0] * 4, nft.Args())
    assert values == pytest.approx([0.0] * 4, abs=1e-12)
    assert grads == pytest.approx([-0.75, 0.25, 0.25, 0.25], abs=1e-12)
    # = −A with Dr.GRPO advantages A = r − mean = [0.75, −0.25, −0.25, −0.25]
    adv = grpo.group_advantages(torch.tensor(rewards), 4, grpo.Args(adv_std="none"))
    assert grads == pytest.approx((-adv).tolist(), abs=1e-7)
    m = out.metrics
    assert (m["pos_tokens"].item(), m["neg_tokens"].item(), m["clamp_hits"].item()) == (1, 3, 0)
    assert m["ratio"].item() == pytest.approx(4.0) and m["rate"].item() == pytest.approx(1.0)
    # normalize=2: ω = √3 → −√3 = −1.732051 and √3 · 1/3 = +0.577350 (GRPO population std: ±… /0.433013)
    _, _, grads = _tokens(rewards, rate.tolist(), [0.0] * 4, nft.Args(normalize=2))
    assert grads == pytest.approx([-math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)], abs=1e-12)


@pytest.mark.parametrize(
    "reward, log_ratio, eps, value, grad, hit",
    [
        # r̂ = 0.25, ω = 0.75 throughout.
        # negative, R = 2: x = (1 − 0.5)/0.75 = 0.666667 < ε = 1 → value −ω log 1 = 0; the gradient passes:
        # −ω · (1/max(x, ε)) · ∂x/∂logp, ∂x/∂logp = −r̂R/(1 − r̂) = −0.666667 → 0.75 · 0.666667 = 0.5
        (0.0, LN(2.0), 1.0, 0.0, 0.5, True),
        # same token with a small ε: value −0.75 · log 0.666667 = 0.75 · 0.405465 = 0.304099;
        # gradient ω · r̂R/(1 − r̂R) = 0.75 · 0.5/0.5 = 0.75
        (0.0, LN(2.0), 0.1, 0.75 * 0.405465, 0.75, False),
        # near R → 1/r̂ = 4: R = 3.9, x = 0.025/0.75 = 0.033333. Small ε: 0.75 · 0.975/0.025 = 29.25 (explodes);
        (0.0, LN(3.9), 1e-3, -0.75 * LN(0.025 / 0.75), 29.25, False),
        # ε = 1: value 0, gradient ω · r̂R/(1 − r̂) = 0.75 · 0.975/0.75 = 0.975 (linear in R)
        (0.0, LN(3.9), 1.0, 0.0, 0.975, True),
        # beyond 1/r̂: R = 5, x = (1 − 1.25)/0.75 = −0.333 (log undefined) → value 0, gradient 0.75 · 1.25/0.75 = 1.25
        (0.0, LN(5.0), 1.0, 0.0, 1.25, True),
        # negative, R = 0.5: x = 0.875/0.75 = 1.166667 ≥ 1 → no clamp: value −0.75 · 0.154151 = −0.115613,
        # gradient ω · r̂R/(1 − r̂R) = 0.75 · 0.125/0.875 = 0.107143
        (0.0, LN(0.5), 1.0, -0.75 * LN(0.875 / 0.75), 0.75 * 0.125 / 0.875, False),
        # positive, R = 2: value −0.75 · log 2 = −0.519860; gradient −ω whatever R (no clip)
        (1.0, LN(2.0), 1.0, -0.75 * LN(2.0), -0.75, False),
        # positive, R = 0.1: value −0.75 · log 0.1 = 1.726938, gradient −0.75
        (1.0, LN(0.1), 1.0, -0.75 * LN(0.1), -0.75, False),
    ],
)
def test_off_policy_golden(reward, log_ratio, eps, value, grad, hit):
    out, values, grads = _tokens([reward], [0.25], [log_ratio], nft.Args(neg_eps=eps))
    assert values[0] == pytest.approx(value, abs=1e-6)
    assert grads[0] == pytest.approx(grad, rel=1e-9)
    assert out.metrics["clamp_hits"].item() == hit
    assert out.metrics["ratio"].item() == pytest.approx(math.exp(log_ratio))


def test_hand_values_spelled_out():
    # the numbers used in the docstring and ALGORITHMS.md
    assert -LN((1 - 0.25 * 2) / 0.75) == pytest.approx(0.405465, abs=1e-6)
    assert 0.75 * 0.975 / 0.025 == pytest.approx(29.25)


def test_ratio_cap():
    # log-ratio 12 > cap 10: R = e^10. Positive: value −ω·10 = −7.5, gradient 0 (min is flat there).
    # Negative: x = (1 − 0.25 e^10)/0.75 < 0 → value 0 (clamped), R constant → gradient 0.
    out, values, grads = _tokens([1.0, 0.0], [0.25, 0.25], [12.0, 12.0], nft.Args())
    assert values == pytest.approx([-7.5, 0.0])
    assert grads == [0.0, 0.0]
    assert out.metrics["ratio"].item() == pytest.approx(2 * math.exp(10.0))
    # below the cap the positive gradient is −ω; a lower cap bites earlier
    _, values, grads = _tokens([1.0], [0.25], [3.0], nft.Args(log_ratio_cap=2.0))
    assert values == pytest.approx([-1.5]) and grads == [0.0]
    _, _, grads = _tokens([1.0], [0.25], [1.5], nft.Args(log_ratio_cap=2.0))
    assert grads == pytest.approx([-0.75])


def test_neg_weight_zero_is_rft():
    # only positive tokens contribute: ∂L/∂logp = −ω on positives, 0 on negatives, on- and off-policy
    g = torch.Generator().manual_seed(3)
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1])
    rate = nft.correct_rate(rewards, 4)  # 0.25, 0.75
    old = -torch.rand(8, 5, generator=g, dtype=torch.float64) * 3
    for shift in (0.0, 0.3):
        logp = (old + shift * torch.randn(8, 5, generator=g, dtype=torch.float64)).requires_grad_()
        out = nft.policy_loss(logp, old, rewards, rate, torch.ones(8, 5), nft.Args(neg_weight=0.0))
        assert out.loss[rewards == 0].abs().sum().item() == 0.0
        (grad,) = torch.autograd.grad(out.loss.sum(), logp)
        w = (1 - rate)[:, None].double()
        expected = torch.where(rewards[:, None] == 1, -w, torch.zeros_like(w)).expand(8, 5)
        assert torch.allclose(grad, expected, atol=1e-12)
        assert out.metrics["neg_tokens"].item() == 4 * 5  # still counted (and in the mask)


def test_constant_groups_keep_a_small_gradient_from_the_clamp():
    # all correct: r̂ = 0.98, ω = 0.02 → −0.02 per positive token (GRPO: 0); all wrong: r̂ = 0.02, ω = 0.98 →
    # 0.98 · 0.02/0.98 = +0.02 per negative token. The stage's dynamic sampling drops such groups.
    rewards = [1.0, 1.0, 0.0, 0.0]
    rate = nft.correct_rate(rewards, 2)
    assert rate.tolist() == pytest.approx([0.98, 0.98, 0.02, 0.02])
    _, _, grads = _tokens(rewards, rate.tolist(), [0.0] * 4, nft.Args())
    assert grads == pytest.approx([-0.02, -0.02, 0.02, 0.02], abs=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Equivalence with Dr.GRPO / GRPO on-policy, through a softmax "model" and the shared aggregation


def _batch(seed, B=3, G=4, T=6, V=7):
    g = torch.Generator().manual_seed(seed)
    # every group mixed, r̂ ∈ {0.25, 0.5, 0.75}: inside [0.02, 0.98]
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.float64)[: B * G]
    logits = torch.randn(B * G, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B * G, T), generator=g)
    lengths = torch.randint(1, T + 1, (B * G,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    return rewards, logits, targets, mask


def _logprobs(logits, targets):
    """fp64 token log-probs (ops.token_logprobs computes in fp32, too coarse for a 1e-12 comparison)."""
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _grad(loss_fn, logits, targets, mask, reduction):
    theta = logits.clone().requires_grad_()
    logp = _logprobs(theta, targets)
    out = loss_fn(logp, logp.detach())
    value = aggregate(out.loss, out.mask, reduction, batch_totals(out.mask))
    (grad,) = torch.autograd.grad(value, theta)
    return value, grad


@pytest.mark.parametrize(
    "normalize, grpo_args",
    [
        (1, grpo.Args(adv_std="none")),  # Dr.GRPO: A = r − mean
        (2, grpo.Args(adv_std="population", adv_eps=0.0)),  # GRPO with the population std
    ],
)
def test_on_policy_gradient_equals_grpo(normalize, grpo_args):
    rewards, logits, targets, mask = _batch(0)
    G = 4
    args = nft.Args(normalize=normalize)
    rate = nft.correct_rate(rewards, G, args)
    adv = grpo.group_advantages(rewards, G, grpo_args)
    v_nft, g_nft = _grad(lambda lp, old: nft.policy_loss(lp, old, rewards, rate, mask, args),
                         logits, targets, mask, nft.reduction(args))
    v_grpo, g_grpo = _grad(lambda lp, old: grpo.policy_loss(lp, old, adv, mask, grpo_args),
                           logits, targets, mask, TOKEN_SUM)
    assert g_grpo.abs().max() > 1e-4  # a real gradient
    assert torch.allclose(g_nft, g_grpo, atol=1e-12, rtol=1e-9)
    assert v_nft.item() == pytest.approx(0.0, abs=1e-12)  # NFT's on-policy value is 0 (log 1) …
    assert v_grpo.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / 1000)  # … GRPO's is −ΣA·m
    # Dr.GRPO's own normaliser N·T_max differs only by a constant factor
    if normalize == 1:
        dr = grpo.Args(adv_std="none", loss_aggregation="seq-mean-token-sum-norm")
        _, g_dr = _grad(lambda lp, old: grpo.policy_loss(lp, old, adv, mask, dr), logits, targets, mask,
                        grpo.reduction(dr, max_tokens=6))
        assert torch.allclose(g_nft * 1000 / (12 * 6), g_dr, atol=1e-12)


def test_on_policy_normalize_2_is_not_the_unbiased_std():
    rewards, logits, targets, mask = _batch(1)
    args = nft.Args(normalize=2)
    rate = nft.correct_rate(rewards, 4, args)
    unbiased = grpo.Args(adv_std="unbiased", adv_eps=0.0)
    adv = grpo.group_advantages(rewards, 4, unbiased)
    _, g_nft = _grad(lambda lp, old: nft.policy_loss(lp, old, rewards, rate, mask, args), logits, targets, mask,
                     nft.reduction(args))
    _, g_grpo = _grad(lambda lp, old: grpo.policy_loss(lp, old, adv, mask, unbiased), logits, targets, mask,
                      TOKEN_SUM)
    # the unbiased std is √(G/(G−1)) larger → its gradient is √(3/4) of NFT's
    assert torch.allclose(g_grpo, g_nft * math.sqrt(3 / 4), atol=1e-12)


def test_off_policy_differs_from_grpo():
    rewards, logits, targets, mask = _batch(2)
    args = nft.Args()
    rate = nft.correct_rate(rewards, 4, args)
    adv = grpo.group_advantages(rewards, 4, grpo.Args(adv_std="none"))
    g = torch.Generator().manual_seed(5)
    stale = _logprobs(logits + 0.5 * torch.randn(logits.shape, generator=g, dtype=torch.float64), targets)
    _, g_nft = _grad(lambda lp, old: nft.policy_loss(lp, stale, rewards, rate, mask, args), logits, targets, mask,
                     nft.reduction(args))
    _, g_grpo = _grad(lambda lp, old: grpo.policy_loss(lp, stale, adv, mask, grpo.Args(adv_std="none")),
                      logits, targets, mask, TOKEN_SUM)
    assert not torch.allclose(g_nft, g_grpo, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Aggregation: token sum / 1000, micro-batch invariance


def test_reduction_mapping():
    assert nft.reduction(nft.Args()) == Reduction("token-sum-norm", norm=1000.0)
    assert nft.reduction(nft.Args(loss_norm=512)) == Reduction("token-sum-norm", norm=512.0)


def test_token_sum_over_1000():
    # off-policy positive tokens: rows [R = 2, R = 2] and [R = 0.5] of a group [1, 1, 0, 0] → r̂ = 0.5, ω = 0.5
    # loss = (−0.5 ln 2 · 2 − 0.5 ln 0.5) / 1000 = −0.5 ln 2 / 1000 = −3.465736e-4
    logp = torch.tensor([[LN(2), LN(2)], [LN(0.5), 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0]])
    rewards = torch.tensor([1.0, 1, 0, 0])
    out = nft.policy_loss(logp, torch.zeros(4, 2), rewards, nft.correct_rate(rewards, 4), mask, nft.Args())
    value = aggregate(out.loss, out.mask, nft.reduction(nft.Args()), batch_totals(out.mask))
    assert value.item() == pytest.approx(-0.5 * LN(2) / 1000)


def test_micro_batch_split_invariance():
    """r̂ is computed on whole groups first; splitting rows (and groups) into micro-batches changes nothing."""
    g = torch.Generator().manual_seed(4)
    N, T, G = 12, 5, 4
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0])
    args = nft.Args(neg_eps=0.5)
    rate = nft.correct_rate(rewards, G, args)
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)).requires_grad_()
    mask = (torch.arange(T) < torch.randint(1, T + 1, (N,), generator=g)[:, None]).long()
    red = nft.reduction(args)
    totals = batch_totals(mask)

    def value(rows):
        out = nft.policy_loss(logp[rows], old[rows], rewards[rows], rate[rows], mask[rows], args)
        return aggregate(out.loss, out.mask, red, totals)

    whole = value(slice(0, N))
    (g_whole,) = torch.autograd.grad(whole, logp)
    parts = [value(slice(a, b)) for a, b in ((0, 3), (3, 5), (5, 12))]  # groups cut across micro-batches
    split = sum(parts)
    (g_split,) = torch.autograd.grad(split, logp)
    assert split.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(g_split, g_whole, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# Loop reference vs the vectorised module


def _loop_token(lp, old, reward, rate, args):
    """(value, ∂value/∂lp, clamp hit) for one token, straight from the equations."""
    w = 1 - rate if args.normalize == 1 else math.sqrt((1 - rate) / rate)
    log_r = min(lp - old, args.log_ratio_cap)
    capped = lp - old > args.log_ratio_cap
    R = math.exp(log_r)
    if reward == 1:
        return -w * log_r, 0.0 if capped else -w, False
    x = (1 - rate * R) / (1 - rate)
    value = -args.neg_weight * w * math.log(max(x, args.neg_eps))
    dx = 0.0 if capped else -rate * R / (1 - rate)
    return value, -args.neg_weight * w * dx / max(x, args.neg_eps), x < args.neg_eps


@pytest.mark.parametrize(
    "args",
    [
        nft.Args(),
        nft.Args(normalize=2),
        nft.Args(neg_eps=0.5, log_ratio_cap=0.6),  # a small ε, a cap that bites
        nft.Args(neg_weight=0.5, rate_min=0.1, rate_max=0.8),
    ],
)
def test_loop_matches_vectorised(args):
    g = torch.Generator().manual_seed(6)
    B, G, T = 4, 5, 6
    N = B * G
    rewards = torch.randint(0, 2, (N,), generator=g).double()
    rewards[:G] = 1.0  # one all-correct group (clamped r̂)
    rewards[G] = 0.0
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.8).requires_grad_()
    mask = (torch.arange(T) < torch.randint(1, T + 1, (N,), generator=g)[:, None]).long()

    rate = nft.correct_rate(rewards, G, args)
    loop_rate = []
    for start in range(0, N, G):
        mean = sum(rewards[start : start + G].tolist()) / G
        loop_rate += [min(max(mean, args.rate_min), args.rate_max)] * G
    assert rate.tolist() == pytest.approx(loop_rate, abs=1e-12)

    out = nft.policy_loss(logp, old, rewards, rate, mask, args)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    hits = total = pos = 0
    for i in range(N):
        for t in range(T):
            if not mask[i, t]:
                assert out.loss[i, t].item() == 0.0 and grad[i, t].item() == 0.0
                continue
            value, d, hit = _loop_token(logp[i, t].item(), old[i, t].item(), rewards[i].item(), loop_rate[i], args)
            assert out.loss[i, t].item() == pytest.approx(value, rel=1e-9, abs=1e-12)
            assert grad[i, t].item() == pytest.approx(d, rel=1e-9, abs=1e-12)
            hits += hit
            total += value
            pos += rewards[i].item() == 1
    assert out.metrics["clamp_hits"].item() == hits
    assert out.metrics["pg_loss"].item() == pytest.approx(total, rel=1e-9)
    assert out.metrics["pos_tokens"].item() == pos
    assert out.metrics["neg_tokens"].item() == mask.sum().item() - pos
    assert out.metrics["rate"].item() == pytest.approx((rate[:, None] * mask).sum().item())
    if args.neg_weight:
        assert 0 < hits < out.metrics["neg_tokens"].item()  # both branches exercised


# ---------------------------------------------------------------------------------------------------------
# Input checks, dtypes, masking


@pytest.mark.parametrize("bad", [[1.0, 0.5], [1.0, -1.0], [0.0, 2.0], [float("nan"), 1.0], [1.1, 0.0]])
def test_check_binary_rejects_shaped_rewards(bad):
    with pytest.raises(ValueError, match="correct/incorrect.*binary verifier"):
        nft.check_binary(bad)
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        nft.correct_rate(bad, 2)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        nft.policy_loss(x, x, torch.tensor(bad), torch.full((2,), 0.5), torch.ones(2, 3), nft.Args())


def test_check_binary_accepts_binary():
    nft.check_binary([0, 1, 1, 0])
    nft.check_binary(torch.tensor([0.0, 1.0], dtype=torch.bfloat16))
    nft.check_binary(torch.tensor([True, False]))


def test_half_precision_inputs_are_computed_in_fp32():
    logp = torch.full((2, 3), -1.0, dtype=torch.bfloat16)
    out = nft.policy_loss(logp, logp + 0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.ones(2, 3),
                          nft.Args())
    assert out.loss.dtype == torch.float32
    # positive: −0.5 · (−0.5) = 0.25; negative: R = e^−0.5 → x = (1 − 0.5 e^−0.5)/0.5 = 2 − e^−0.5
    assert out.loss[0].tolist() == pytest.approx([0.25] * 3)
    assert out.loss[1].tolist() == pytest.approx([-0.5 * LN(2 - math.exp(-0.5))] * 3, rel=1e-6)


def test_old_logp_rewards_rate_are_constants():
    logp = torch.zeros(2, 2, requires_grad=True)
    old = torch.zeros(2, 2, requires_grad=True)
    rate = torch.tensor([0.5, 0.5], requires_grad=True)
    out = nft.policy_loss(logp, old, torch.tensor([1.0, 0.0]), rate, torch.ones(2, 2), nft.Args())
    g_logp, g_old, g_rate = torch.autograd.grad(out.loss.sum(), [logp, old, rate], allow_unused=True)
    assert g_logp.tolist() == [[-0.5, -0.5], [0.5, 0.5]] and g_old is None and g_rate is None


def test_padding_garbage_does_not_leak():
    # huge log-ratios on padded positions: capped, zeroed in the loss and the gradient, excluded from metrics
    logp = torch.tensor([[0.0, 500.0], [0.0, -500.0]], requires_grad=True)
    old = torch.tensor([[0.0, -500.0], [0.0, 500.0]])
    out = nft.policy_loss(logp, old, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([[1, 0], [1, 0]]),
                          nft.Args())
    assert out.loss.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    assert grad.tolist() == [[-0.5, 0.0], [0.5, 0.0]]
    assert all(math.isfinite(v.item()) for v in out.metrics.values())
    assert out.metrics["ratio"].item() == 2.0


# ---------------------------------------------------------------------------------------------------------
# The RL stage's contract: credit → rows → collate → loss, reduction, no reference model


def test_stage_contract_through_the_stage_batching():
    from posttrain.rollout.base import Completion
    from posttrain.stages.rl import Group, PromptSet, algorithm_of, build_rows, collate_rl

    args = nft.Args()
    assert algorithm_of(args) is nft and nft.needs_reference(args) is False
    assert nft.reduction(args, 512) == Reduction("token-sum-norm", norm=1000.0)  # max_tokens is not used
    prompts = PromptSet(ids=[[5, 6, 7]], texts=["x"], columns={})
    comps = [Completion(prompt_index=0, token_ids=[8, 9, 2][: 1 + k % 3], text="", logprobs=None, finish_reason="stop")
             for k in range(4)]
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    credit = nft.credit(rewards, 4, args)
    assert credit["reward"].tolist() == [1, 0, 0, 0] and credit["rate"].tolist() == pytest.approx([0.25] * 4)
    groups = [Group(prompt=0, completions=comps, rewards=rewards.tolist(), per_reward={})]
    batch = collate_rl(build_rows(groups, [True], prompts, credit), pad_id=0)
    logp = torch.full(batch["mask"].shape, -1.0, requires_grad=True)
    out = nft.loss(logp, batch, args)  # no old_logp in the batch: on-policy
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    expected = torch.tensor([-0.75, 0.25, 0.25, 0.25])[:, None] * batch["mask"]
    assert torch.allclose(grad, expected)
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        nft.credit(torch.tensor([1.0, 0.5]), 2, args)


# ---------------------------------------------------------------------------------------------------------
# Args in the recipe schema


def test_defaults_are_the_official_run():
    a = nft.Args()
    assert (a.normalize, a.neg_weight, a.neg_eps, a.rate_min, a.rate_max, a.log_ratio_cap, a.loss_norm) == (
        1, 1.0, 1.0, 0.02, 0.98, 10.0, 1000.0
    )
    with pytest.raises(ValueError, match="rate_min"):
        nft.Args(rate_min=0.5, rate_max=0.4)
    with pytest.raises(ValueError, match="normalize"):
        nft.Args(normalize=3)


def test_args_build_a_strict_rl_stage_schema():
    model = stage_args_model("nft_test", nft.Args, rl=True)  # asserts no clash with the shared RL args
    train, algo = split_args(model(), nft.Args, rl=True)
    assert algo == nft.Args()
    _, rft = split_args(model(neg_weight=0.0, normalize=2, lr=1e-6, group_size=16), nft.Args, rl=True)
    assert rft.neg_weight == 0.0 and rft.normalize == 2
    for bad in ({"normalize": 3}, {"neg_weight": -1}, {"neg_eps": 0}, {"rate_min": 0}, {"rate_max": 1},
                {"log_ratio_cap": 0}, {"loss_norm": 0}, {"no_such_arg": 1}):
        with pytest.raises(ValidationError):
            model(**bad)
