"""Golden values for GRPO / Dr.GRPO / DAPO (hand-derived in the comments; see ALGORITHMS.md)."""

import math

import pytest
import torch
from pydantic import ValidationError

from posttrain.algorithms import grpo
from posttrain.algorithms.ops import aggregate, batch_totals
from posttrain.datatypes import Reduction
from posttrain.recipe.schema import split_args, stage_args_model

LN = math.log

# ---------------------------------------------------------------------------------------------------------
# Group-relative advantages


@pytest.mark.parametrize(
    "adv_std, eps, expected",
    [
        # r = [1,0,0,1]: mean 0.5, r − mean = ±0.5
        ("unbiased", 0.0, 0.866025),  # std = sqrt((4 · 0.25) / 3) = 0.577350 → 0.5 / 0.577350
        ("population", 0.0, 1.0),  # std = sqrt((4 · 0.25) / 4) = 0.5
        ("none", 0.0, 0.5),  # Dr.GRPO: r − mean
        ("unbiased", 1e-6, 0.866025),  # the default eps moves it by ~1.5e-6
    ],
)
def test_advantage_golden(adv_std, eps, expected):
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, grpo.Args(adv_std=adv_std, adv_eps=eps))
    assert adv.tolist() == pytest.approx([expected, -expected, -expected, expected], abs=1e-5)


@pytest.mark.parametrize("adv_std", ["unbiased", "population", "none"])
def test_zero_variance_group_is_exactly_zero(adv_std):
    # 0.1 · 3 / 3 ≠ 0.1 in floating point, so r − mean alone is not exactly 0 (and /eps would blow it up)
    for rewards in ([0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
        for eps in (0.0, 1e-6):
            adv = grpo.group_advantages(rewards, 3, grpo.Args(adv_std=adv_std, adv_eps=eps))
            assert torch.equal(adv, torch.zeros(3))


def test_two_groups_at_once():
    # group 1: [1,0,0,1] → ±1 (population); group 2: [0,0,0,4], mean 1, r − mean = [−1,−1,−1,3],
    # population std = sqrt((1+1+1+9)/4) = sqrt(3) → [−1/√3]·3 + [√3]; group 3: constant → 0
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 4, 2, 2, 2, 2])
    adv = grpo.group_advantages(rewards, 4, grpo.Args(adv_std="population", adv_eps=0.0))
    s = 1 / math.sqrt(3)
    assert adv.tolist() == pytest.approx([1, -1, -1, 1, -s, -s, -s, math.sqrt(3), 0, 0, 0, 0], abs=1e-6)


@pytest.mark.parametrize("adv_std", ["unbiased", "population", "none"])
def test_group_of_one_gives_zero_not_nan(adv_std):
    # the unbiased std of one sample is 0/0; with G = 1 there is no baseline, so A = 0
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 3.0]), 1, grpo.Args(adv_std=adv_std))
    assert torch.equal(adv, torch.zeros(3))


def test_group_size_must_divide_rows():
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(torch.zeros(5), 2, grpo.Args())


# ---------------------------------------------------------------------------------------------------------
# Clipped surrogate (single token, old_logp = 0 so ρ = exp(logp))


def _one_token(a, rho, args, **kw):
    logp = torch.tensor([[LN(rho)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    out = grpo.policy_loss(logp, old, torch.tensor([a]), torch.ones(1, 1), args, **kw)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    return out, out.loss.item(), grad.item()


DAPO_CLIP = grpo.Args(clip_low=0.2, clip_high=0.28)
DUAL = grpo.Args(clip_low=0.2, clip_high=0.28, dual_clip=3.0)


@pytest.mark.parametrize(
    "a, rho, args, loss, grad, clipped",
    [
        # A = +1, ρ = 1.3: max(−1.3, −clip(1.3, 0.8, 1.28) = −1.28) = −1.28, a constant → ∂/∂logp = 0
        (1.0, 1.3, DAPO_CLIP, -1.28, 0.0, "high"),
        # A = +1, ρ = 0.5: max(−0.5, −0.8) = −0.5 (unclipped); ∂(−A·e^{logp−old})/∂logp = −A·ρ = −0.5
        (1.0, 0.5, DAPO_CLIP, -0.5, -0.5, None),
        # inside the trust region: −1.1, gradient −1.1
        (1.0, 1.1, DAPO_CLIP, -1.1, -1.1, None),
        # A = −1, ρ = 0.5: max(0.5, 0.8) = 0.8 (clipped below), gradient 0
        (-1.0, 0.5, DAPO_CLIP, 0.8, 0.0, "low"),
        # A = −1, ρ = 1.3: max(1.3, 1.28) = 1.3 (unclipped: pushing a bad token down is never clipped), grad +1.3
        (-1.0, 1.3, DAPO_CLIP, 1.3, 1.3, None),
        # A = −1, ρ = 5, no dual clip: 5, grad 5
        (-1.0, 5.0, DAPO_CLIP, 5.0, 5.0, None),
        # dual clip c = 3, A = −1, ρ = 5: min(max(5, 1.28), −A·c = 3) = 3, constant → grad 0
        (-1.0, 5.0, DUAL, 3.0, 0.0, "dual"),
        # dual clip c = 3, A = −2, ρ = 5: min(10, 6) = 6
        (-2.0, 5.0, DUAL, 6.0, 0.0, "dual"),
        # dual clip c = 3, A = −1, ρ = 2: min(2, 3) = 2, grad 2 (below c the dual clip does nothing)
        (-1.0, 2.0, DUAL, 2.0, 2.0, None),
        # dual clip never applies to A > 0: ρ = 5 → −1.28 as without it
        (1.0, 5.0, DUAL, -1.28, 0.0, "high"),
    ],
)
def test_clipped_surrogate_golden(a, rho, args, loss, grad, clipped):
    out, value, g = _one_token(a, rho, args)
    assert value == pytest.approx(loss, abs=1e-9)
    assert g == pytest.approx(grad, abs=1e-9)
    m = out.metrics
    assert m["clip_frac_high"].item() == (clipped == "high")
    assert m["clip_frac_low"].item() == (clipped == "low")
    assert m["clip_frac"].item() == (clipped in ("high", "low"))
    if args.dual_clip is not None:
        assert m["dual_clip_frac"].item() == (clipped == "dual")
    assert m["ratio"].item() == pytest.approx(rho)
    assert m["pg_loss"].item() == pytest.approx(loss)


def test_half_precision_inputs_are_computed_in_fp32():
    logp = torch.full((2, 3), -1.0, dtype=torch.bfloat16)
    out = grpo.policy_loss(logp, logp, torch.tensor([1.0, -1.0]), torch.ones(2, 3), grpo.Args())
    assert out.loss.dtype == torch.float32
    assert out.loss.tolist() == [[-1.0] * 3, [1.0] * 3]


# ---------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_golden_and_gradients():
    # logp = ln 0.5, ref = ln 0.25 → δ = ref − logp = ln 0.5 = −0.693147
    logp = torch.tensor(LN(0.5), dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(LN(0.25), dtype=torch.float64)
    d = LN(0.5)
    cases = {
        "k1": (0.693147, 1.0),  # −δ;               ∂/∂logp = 1
        "k2": (0.240227, -d),  # δ²/2 = 0.480453/2; ∂/∂logp = −δ = 0.693147
        "k3": (0.193147, 1 - math.exp(d)),  # e^δ − δ − 1 = 0.5 + 0.693147 − 1; ∂/∂logp = 1 − e^δ = 0.5
    }
    for name, (value, grad) in cases.items():
        k = grpo.kl_penalty(logp, ref, name)
        (g,) = torch.autograd.grad(k, logp)
        assert k.item() == pytest.approx(value, abs=1e-6), name
        assert g.item() == pytest.approx(grad, abs=1e-9), name
    with pytest.raises(ValueError, match="k4"):
        grpo.kl_penalty(logp, ref, "k4")


def test_kl_estimators_expected_gradient_exactly():
    """E_{y~π}[∇θ k(y)] summed exactly over a 5-token vocabulary (sampling held fixed, as in a loss term):
    k1 → 0, k2 → ∇KL(π‖ref) (reverse), k3 → ∇KL(ref‖π) (forward)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)
        (gr,) = torch.autograd.grad((logp.exp().detach() * grpo.kl_penalty(logp, ref, estimator)).sum(), theta)
        return gr

    logp = torch.log_softmax(theta, -1)
    (reverse,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)
    logp = torch.log_softmax(theta, -1)
    (forward,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)
    assert torch.allclose(expected_grad("k1"), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(expected_grad("k2"), reverse, atol=1e-12)
    assert torch.allclose(expected_grad("k3"), forward, atol=1e-12)
    assert not torch.allclose(reverse, forward, atol=1e-3)


def test_kl_term_is_added_with_kl_coef():
    # on-policy, A = 0 → loss is β·k3 = 0.04 · 0.193147
    logp = torch.full((1, 2), LN(0.5))
    ref = torch.full((1, 2), LN(0.25))
    args = grpo.Args(kl_coef=0.04)
    out = grpo.policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), args, ref_logp=ref)
    assert out.loss[0].tolist() == pytest.approx([0.04 * 0.193147] * 2, abs=1e-7)
    assert out.metrics["kl"].item() == pytest.approx(2 * 0.193147, abs=1e-6)
    # with β = 0 the reference is only monitored
    out = grpo.policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), grpo.Args(), ref_logp=ref)
    assert out.loss.abs().sum().item() == 0.0 and out.metrics["kl"].item() == pytest.approx(2 * 0.193147, abs=1e-6)


def test_kl_coef_without_ref_logp_raises():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.policy_loss(x, x, torch.ones(1), torch.ones(1, 2), grpo.Args(kl_coef=0.04))


# ---------------------------------------------------------------------------------------------------------
# Aggregation


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("token-mean", 1 / 3),  # (1 + 1) / 6 tokens (DAPO)
        ("seq-mean-token-mean", 0.5),  # (2/2 + 0/4) / 2 rows (GRPO)
        ("seq-mean-token-sum-norm", 0.25),  # 2 / (2 rows · T_max 4) (Dr.GRPO)
    ],
)
def test_aggregation_golden_through_policy_loss(aggregation, expected):
    # on-policy ρ = 1: A = −1 gives per-token loss 1, A = 0 gives 0 → rows [1, 1] and [0, 0, 0, 0]
    logp = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    args = grpo.Args(loss_aggregation=aggregation)
    out = grpo.policy_loss(logp, logp, torch.tensor([-1.0, 0.0]), mask, args)
    assert out.loss.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    value = aggregate(out.loss, out.mask, grpo.reduction(args, max_tokens=4), batch_totals(out.mask))
    assert value.item() == pytest.approx(expected)


def test_reduction_mapping():
    assert grpo.reduction(grpo.Args(), 512) == Reduction("seq-mean-token-mean")
    assert grpo.reduction(grpo.Args(loss_aggregation="token-mean"), 512) == Reduction("token-mean")
    assert grpo.reduction(grpo.Args(loss_aggregation="seq-mean-token-sum-norm"), 512) == Reduction(
        "seq-mean-token-sum-norm", norm=512.0
    )
    with pytest.raises(ValueError):
        grpo.reduction(grpo.Args(loss_aggregation="seq-mean-token-sum-norm"), 0)


# ---------------------------------------------------------------------------------------------------------
# Loop reference vs the vectorised module


def _loop_advantages(rewards, group_size, args):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        if max(group) == min(group) or len(group) == 1:
            out += [0.0] * len(group)
            continue
        if args.adv_std == "none":
            out += [r - mean for r in group]
            continue
        dof = len(group) - (1 if args.adv_std == "unbiased" else 0)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / dof)
        out += [(r - mean) / (std + args.adv_eps) for r in group]
    return out


def _loop_token(lp, old, a, args, ref=None, roll=None):
    rho = math.exp(lp - old)
    clipped_rho = min(max(rho, 1 - args.clip_low), 1 + args.clip_high)
    pg = max(-a * rho, -a * clipped_rho)
    if args.dual_clip is not None and a < 0:
        pg = min(pg, -a * args.dual_clip)
    if args.tis_cap is not None:
        pg *= min(math.exp(old - roll), args.tis_cap)
    if args.kl_coef > 0:
        d = ref - lp
        kl = {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[args.kl_estimator]
        pg += args.kl_coef * kl
    return pg, -a * clipped_rho > -a * rho


@pytest.mark.parametrize(
    "args",
    [
        grpo.Args(),
        grpo.Args(kl_coef=0.04, adv_std="population"),  # GRPO paper
        grpo.Args(adv_std="none", loss_aggregation="seq-mean-token-sum-norm", kl_coef=0.1, kl_estimator="k1"),
        grpo.Args(clip_high=0.28, dual_clip=3.0, tis_cap=2.0, mask_truncated=True, kl_coef=0.1, kl_estimator="k2"),
    ],
)
def test_loop_matches_vectorised(args):
    g = torch.Generator().manual_seed(1)
    B, G, T = 3, 4, 7
    N = B * G
    rewards = torch.randint(0, 3, (N,), generator=g).double()
    rewards[G : 2 * G] = 1.0  # one zero-variance group
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3
    roll = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.5
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    truncated = lengths == T

    adv = grpo.group_advantages(rewards, G, args)
    ref_adv = _loop_advantages(rewards.tolist(), G, args)
    assert adv.tolist() == pytest.approx(ref_adv, abs=1e-12)

    out = grpo.policy_loss(logp, old, adv, mask, args, ref_logp=ref, rollout_logp=roll, truncated=truncated)
    clipped_count, loss_sum = 0, 0.0
    for i in range(N):
        keep = not (args.mask_truncated and truncated[i])
        for t in range(T):
            on = bool(mask[i, t]) and keep
            assert bool(out.mask[i, t]) == on
            if not on:
                assert out.loss[i, t].item() == 0.0
                continue
            value, clipped = _loop_token(logp[i, t].item(), old[i, t].item(), ref_adv[i], args,
                                         ref[i, t].item(), roll[i, t].item())
            assert out.loss[i, t].item() == pytest.approx(value, rel=1e-9, abs=1e-12)
            clipped_count += clipped
            loss_sum += value
    assert out.metrics["clip_frac"].item() == clipped_count
    if args.kl_coef == 0:
        assert out.metrics["pg_loss"].item() == pytest.approx(loss_sum, rel=1e-9, abs=1e-12)
    assert clipped_count > 0  # the random draw exercises both branches


# ---------------------------------------------------------------------------------------------------------
# Gradients, TIS, masking


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_on_policy_gradient_is_plain_policy_gradient(aggregation):
    """logp == old_logp: ∂L/∂logp_it = −A_i · m_it / (Σ m) for token-mean, −A_i·m_it / (N·|o_i|) for seq-mean."""
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).long()
    args = grpo.Args(loss_aggregation=aggregation)
    out = grpo.policy_loss(logp, logp.detach(), adv, mask, args)
    (grad,) = torch.autograd.grad(aggregate(out.loss, out.mask, grpo.reduction(args, 5), batch_totals(mask)), logp)
    if aggregation == "token-mean":
        expected = -adv[:, None] * mask / mask.sum()
    else:
        expected = -adv[:, None] * mask / (mask.sum(-1, keepdim=True) * 6)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_tis_weight_is_capped_and_detached():
    # old − rollout = ln 3 → min(3, 2) = 2;  ln 0.5 → 0.5. On-policy A = +1: loss −w, ∂/∂logp = −w.
    logp = torch.zeros(1, 2, requires_grad=True)
    rollout = torch.tensor([[-LN(3.0), -LN(0.5)]], requires_grad=True)
    args = grpo.Args(tis_cap=2.0)
    out = grpo.policy_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), args, rollout_logp=rollout)
    assert out.loss[0].tolist() == pytest.approx([-2.0, -0.5])
    assert out.metrics["tis_weight"].item() == pytest.approx(2.5)
    g_logp, g_roll = torch.autograd.grad(out.loss.sum(), [logp, rollout], allow_unused=True)
    assert g_logp[0].tolist() == pytest.approx([-2.0, -0.5])
    assert g_roll is None
    with pytest.raises(ValueError, match="rollout_logp"):
        grpo.policy_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), args)


def test_old_logp_is_a_constant():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2, requires_grad=True)
    out = grpo.policy_loss(logp, old, torch.ones(1), torch.ones(1, 2), grpo.Args())
    g_logp, g_old = torch.autograd.grad(out.loss.sum(), [logp, old], allow_unused=True)
    assert g_logp.tolist() == [[-1.0, -1.0]] and g_old is None


def test_mask_truncated_zeroes_truncated_rows():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    truncated = torch.tensor([False, True])
    on = grpo.policy_loss(logp, logp, torch.ones(2), mask, grpo.Args(mask_truncated=True), truncated=truncated)
    assert on.mask.tolist() == [[True] * 3, [False] * 3]
    assert on.loss.tolist() == [[-1.0] * 3, [0.0] * 3]
    assert on.metrics["ratio"].item() == 3.0  # sums over the effective mask only
    off = grpo.policy_loss(logp, logp, torch.ones(2), mask, grpo.Args(), truncated=truncated)
    assert off.mask.all()
    with pytest.raises(ValueError, match="truncated"):
        grpo.policy_loss(logp, logp, torch.ones(2), mask, grpo.Args(mask_truncated=True))


def test_padding_garbage_does_not_leak():
    # huge log-ratios on padded positions: clamped before exp, zeroed in the loss, excluded from metrics
    logp = torch.tensor([[0.0, 500.0]])
    old = torch.tensor([[0.0, -500.0]])
    out = grpo.policy_loss(logp, old, torch.tensor([-1.0]), torch.tensor([[1, 0]]), grpo.Args())
    assert out.loss.tolist() == [[1.0, 0.0]]
    assert all(math.isfinite(v.item()) for v in out.metrics.values())


# ---------------------------------------------------------------------------------------------------------
# Args in the recipe schema


def test_args_build_a_strict_stage_schema():
    model = stage_args_model("grpo_test", grpo.Args)
    _, algo = split_args(model(), grpo.Args)
    assert algo == grpo.Args()
    assert (algo.adv_std, algo.clip_low, algo.clip_high, algo.kl_coef, algo.kl_estimator, algo.loss_aggregation) == (
        "unbiased", 0.2, 0.2, 0.0, "k3", "seq-mean-token-mean"
    )
    _, dapo = split_args(
        model(clip_high=0.28, loss_aggregation="token-mean", dual_clip=3.0, tis_cap=2.0, lr=1e-6), grpo.Args
    )
    assert dapo.clip_high == 0.28 and dapo.dual_clip == 3.0 and dapo.loss_aggregation == "token-mean"
    for bad in ({"clip_low": -1}, {"clip_low": 1.0}, {"adv_std": "bogus"}, {"kl_estimator": "k4"},
                {"kl_coef": -0.1}, {"dual_clip": 0.5}, {"tis_cap": 0}, {"ppo_epochs": 0}, {"no_such_arg": 1}):
        with pytest.raises(ValidationError):
            model(**bad)
