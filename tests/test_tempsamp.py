"""TempSamp-R1's pure math (posttrain/algorithms/tempsamp.py): soft advantage, the off-policy row and its ratio."""

import math

import pytest
import torch

from posttrain.algorithms import grpo, tempsamp


def test_soft_reward_matches_the_hand_computed_values():
    # ALGORITHMS.md, τ = 0.8, α = 1: r ≥ τ → τ + 0.01·ln(r − τ + 1); r < τ → τ − (e^{α(τ−r)} − 1)/(e − 1)
    got = tempsamp.soft_reward(torch.tensor([1.0, 0.5, 0.0]), 0.8, 1.0)
    assert got.tolist() == pytest.approx([0.801823, 0.596390, 0.086764], abs=5e-7)
    # by hand at the branch point and with another α
    assert float(tempsamp.soft_reward(torch.tensor([0.8]))) == pytest.approx(0.8)
    assert float(tempsamp.soft_reward(torch.tensor([0.3]), 0.8, 2.0)) == pytest.approx(0.8 - math.expm1(1.0) / math.expm1(2.0))


def test_soft_reward_is_increasing_and_compresses_above_tau():
    r = torch.linspace(0, 1.1, 111)
    shaped = tempsamp.soft_reward(r)
    assert bool((shaped[1:] > shaped[:-1]).all())
    top = tempsamp.soft_reward(torch.tensor([0.9, 1.0]))
    assert float(top[1] - top[0]) < 0.002  # IoU 0.9 and 1.0 are almost the same credit


def test_reference_row_is_the_last_of_each_group_and_counts_in_the_group_statistics():
    args = tempsamp.Args()
    iou = [0.0, 0.5, 0.9, 1.0,   0.2, 0.2, 0.2, 1.0]  # G = 4, last = ground truth
    rewards = tempsamp.reward_total({"temporal_iou": iou, "format": [1.0] * 8}, {"temporal_iou": 1.0, "format": 0.1}, args)
    credit = tempsamp.credit(rewards, 4, args)
    assert credit["offpolicy"].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    shaped = (tempsamp.soft_reward(torch.tensor(iou)) + 0.1).view(2, 4)
    mean, std = shaped.mean(1, keepdim=True), shaped.std(1, keepdim=True)
    expected = ((shaped - mean) / (std + args.adv_eps)).reshape(-1)
    assert credit["adv"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    # without the ground-truth row the sampled rows of group 2 would have zero advantage; with it they are negative
    assert all(a < 0 for a in credit["adv"][4:7].tolist())
    # a near-perfect sample (0.9) gets almost the ground truth's advantage
    assert float(credit["adv"][3] - credit["adv"][2]) < 0.05 * float(credit["adv"][3])


def test_soft_advantage_shapes_the_iou_alone_and_adds_the_format_term_after():
    # One group, format scores differ across rows; weights IoU 1, format 0.1 (the official reward). By hand:
    #   soft(0.9) = 0.8 + 0.01·ln(1.1)              = 0.800953      + 0.1·1 = 0.900953
    #   soft(0.7) = 0.8 − (e^0.1 − 1)/(e − 1)       = 0.738793      + 0.1·1 = 0.838793
    #   soft(0.7)                                   = 0.738793      + 0.1·0 = 0.738793
    #   soft(0.0) = 0.8 − (e^0.8 − 1)/(e − 1)       = 0.086764      + 0.1·1 = 0.186764
    #   soft(1.0) = 0.8 + 0.01·ln(1.2) (the GT row) = 0.801823      + 0.1·1 = 0.901823
    args = tempsamp.Args()
    per_reward = {"temporal_iou": [0.9, 0.7, 0.7, 0.0, 1.0], "format": [1.0, 1.0, 0.0, 1.0, 1.0]}
    total = tempsamp.reward_total(per_reward, {"temporal_iou": 1.0, "format": 0.1}, args)
    assert total.tolist() == pytest.approx([0.900953, 0.838793, 0.738793, 0.186764, 0.901823], abs=1e-6)
    # τ is an IoU threshold: IoU 0.7 with good format is not on the plateau. Shaping the weighted total
    # (0.7 + 0.1 = 0.8 ≥ τ) would have given it 0.8, within 0.001 of IoU 0.9's 0.800953.
    assert float(total[0] - total[1]) == pytest.approx(0.062160, abs=1e-6)
    credit = tempsamp.credit(total, 5, args)
    expected = grpo.group_advantages(torch.tensor([0.900953, 0.838793, 0.738793, 0.186764, 0.901823]), 5, args)
    assert credit["adv"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # an abstaining reward adds nothing; without soft_advantage the total is the Scorer's plain weighted sum
    with_none = tempsamp.reward_total({"temporal_iou": [0.5], "format": [None]}, {"temporal_iou": 1.0, "format": 0.1}, args)
    assert with_none.tolist() == pytest.approx([0.596390], abs=1e-6)
    plain = tempsamp.reward_total(per_reward, {"temporal_iou": 2.0, "format": 0.1}, tempsamp.Args(soft_advantage=False))
    assert plain.tolist() == pytest.approx([1.9, 1.5, 1.4, 0.1, 2.1])
    with pytest.raises(ValueError, match="shaped_reward: 'temporal_iou' is not one of the stage's rewards"):
        tempsamp.reward_total({"math": [1.0]}, {"math": 1.0}, args)


def test_grpo_variant_without_reference_rows():
    args = tempsamp.Args(offpolicy=False, soft_advantage=False)
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5])
    credit = tempsamp.credit(rewards, 2, args)
    assert credit["offpolicy"].tolist() == [0, 0, 0, 0]
    assert credit["adv"].tolist() == pytest.approx(grpo.group_advantages(rewards, 2, args).tolist())


def _batch(logp_old, adv, off, mask=None):
    n, t = logp_old.shape
    return {"old_logp": logp_old, "adv": torch.tensor(adv), "offpolicy": torch.tensor(off, dtype=torch.float32),
            "mask": torch.ones(n, t, dtype=torch.long) if mask is None else mask,
            "rollout_logp": torch.full((n, t), -9.0)}


def test_reference_row_has_ratio_one_and_an_advantage_weighted_nll_gradient():
    args = tempsamp.Args(tis_cap=2.0)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    # row 0 sampled (stale old_logp → ratio ≠ 1), row 1 the reference with a meaningless old/rollout logp
    old = torch.tensor([[-1.5, -2.0], [-7.0, -7.0]])
    batch = _batch(old, [1.0, 2.0], [0.0, 1.0])
    out = tempsamp.loss(logp, batch, args)
    out.loss.sum().backward()
    # reference row: loss −A·ρ with ρ ≡ 1 (value −2 per token), gradient −A per token, no clipping, TIS weight 1
    assert out.loss[1].tolist() == pytest.approx([-2.0, -2.0])
    assert logp.grad[1].tolist() == pytest.approx([-2.0, -2.0])
    # sampled row: the GRPO surrogate with its own old_logp (ρ = e^0.5 clipped at 1.2 for A > 0 → no gradient)
    ref = grpo.policy_loss(logp.detach()[:1], old[:1], torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.long),
                           args, rollout_logp=torch.full((1, 2), -9.0))
    assert out.loss[0].tolist() == pytest.approx(ref.loss[0].tolist())
    assert float(out.metrics["ratio"]) == pytest.approx(float(ref.metrics["ratio"]) + 2.0)


def test_render_reference_formats_spans_and_generic_answers():
    assert tempsamp.render_reference({"span": [2.0, 5.5]}, tempsamp.Args()) == "<answer> 2.00 to 5.50 </answer>"
    math_args = tempsamp.Args(reference="{solution} The answer is \\boxed{{{answer}}}.")
    assert tempsamp.render_reference({"solution": "2+2=4.", "answer": "4"}, math_args) == \
        "2+2=4. The answer is \\boxed{4}."
    with pytest.raises(ValueError, match="cannot be rendered"):
        tempsamp.render_reference({"query": "x"}, tempsamp.Args())
