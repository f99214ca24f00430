"""Golden values for SPO win-rate rewards (hand-derived in the comments; see ALGORITHMS.md)."""

import math

import pytest
import torch
from pydantic import ValidationError

from posttrain.algorithms import grpo, spo
from posttrain.recipe.schema import split_args, stage_args_model

# ---------------------------------------------------------------------------------------------------------
# Judges and win rates


def test_rule_scores_golden():
    # scores [3,1,2,0], P = 1[s_i > s_j]: 3 beats all (1), 1 beats 0 only (1/3), 2 beats 1 and 0 (2/3), 0 none
    J = spo.rule_preference([3.0, 1.0, 2.0, 0.0])
    assert J.tolist() == [[0.5, 1, 1, 1], [0, 0.5, 0, 1], [0, 1, 0.5, 1], [0, 0, 0, 0.5]]
    win = spo.win_rates(spo.symmetrize(J))
    assert win.tolist() == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])
    assert spo.preference_rewards(J, spo.Args()).tolist() == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])


def test_ties_give_half():
    # scores [1,1,0]: the tie is ½ → win = [(½ + 1)/2, (½ + 1)/2, 0] = [0.75, 0.75, 0]
    J = spo.rule_preference([1.0, 1.0, 0.0])
    assert J[0, 1].item() == 0.5 and J[1, 0].item() == 0.5
    assert spo.win_rates(spo.symmetrize(J)).tolist() == pytest.approx([0.75, 0.75, 0.0])
    # all tied → every win rate ½
    assert spo.win_rates(spo.rule_preference([2.0] * 5)).tolist() == [0.5] * 5


def test_rock_paper_scissors_gives_zero_advantage():
    # A ≻ B, B ≻ C, C ≻ A: win_A = (P_AB + P_AC)/2 = (1 + 0)/2 = ½, and likewise for B and C
    J = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]])
    win = spo.preference_rewards(J, spo.Args())
    assert win.tolist() == [0.5, 0.5, 0.5]
    for adv_std in ("unbiased", "population", "none"):
        assert torch.equal(grpo.group_advantages(win, 3, grpo.Args(adv_std=adv_std)), torch.zeros(3))
    # a stochastic cycle (each beats the next with probability 0.8) is just as balanced: (0.8 + 0.2)/2 = ½
    J = torch.tensor([[0.5, 0.8, 0.2], [0.2, 0.5, 0.8], [0.8, 0.2, 0.5]])
    assert spo.preference_rewards(J, spo.Args()).tolist() == pytest.approx([0.5] * 3)


def test_symmetrize_removes_position_bias():
    # a judge that always prefers whatever is shown first: J_ij = 1 for all i ≠ j → P_ij = ½(1 + 1 − 1) = ½
    G = 4
    first = torch.ones(G, G)
    assert spo.symmetrize(first).tolist() == [[0.5] * G] * G
    assert spo.preference_rewards(first, spo.Args()).tolist() == [0.5] * G
    # without symmetrisation the bias is taken at face value: every completion "wins" every pair
    assert spo.preference_rewards(first, spo.Args(symmetrize=False)).tolist() == [1.0] * G
    # a constant bias b on a consistent judge Q (Q_ij + Q_ji = 1): ½(Q_ij + b + 1 − Q_ji − b) = Q_ij
    Q = spo.bradley_terry_preference(torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=torch.float64))  # max σ(0.9) = 0.71
    assert Q.max() + 0.15 <= 1.0  # the biased judge is still a probability
    biased = Q + 0.15 * (1 - torch.eye(G, dtype=torch.float64))
    assert torch.allclose(spo.symmetrize(biased), Q, atol=1e-12)


def test_symmetrize_properties():
    g = torch.Generator().manual_seed(1)
    J = torch.rand(3, 5, 5, generator=g, dtype=torch.float64)  # an arbitrary (inconsistent) judge
    P = spo.symmetrize(J)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones_like(P), atol=1e-12)
    assert torch.equal(P.diagonal(dim1=-2, dim2=-1), torch.full((3, 5), 0.5, dtype=torch.float64))
    assert P[1, 2, 3].item() == pytest.approx(0.5 * (J[1, 2, 3].item() + 1 - J[1, 3, 2].item()))
    # hence every group's win rates average ½ (Σ_i win_i = G/2) and Dr.GRPO's advantage is win − ½
    win = spo.group_win_rates(P)
    assert win.view(3, 5).mean(-1).tolist() == pytest.approx([0.5] * 3)
    adv = grpo.group_advantages(win, 5, grpo.Args(adv_std="none"))
    assert torch.allclose(adv, win - 0.5, atol=1e-12)


def test_bradley_terry():
    # equal scores → ½ everywhere
    assert spo.bradley_terry_preference([0.7, 0.7, 0.7]).tolist() == [[0.5] * 3] * 3
    # scores [0, ln 3]: P_10 = σ(ln 3) = 3/4, P_01 = 1/4 → win = [0.25, 0.75]
    J = spo.bradley_terry_preference([0.0, math.log(3.0)])
    assert J[1, 0].item() == pytest.approx(0.75) and J[0, 1].item() == pytest.approx(0.25)
    assert spo.preference_rewards(J, spo.Args()).tolist() == pytest.approx([0.25, 0.75])
    # already symmetric (σ(a) + σ(−a) = 1): symmetrising changes nothing
    s = torch.randn(6, dtype=torch.float64)
    J = spo.bradley_terry_preference(s)
    assert torch.allclose(spo.symmetrize(J), J, atol=1e-12)
    # scores [0, ln 3, ln 3]: win_0 = (¼ + ¼)/2 = ¼; win_1 = (¾ + ½)/2 = 0.625 = win_2
    J = spo.bradley_terry_preference([0.0, math.log(3.0), math.log(3.0)])
    assert spo.win_rates(J).tolist() == pytest.approx([0.25, 0.625, 0.625])


def test_batched_equals_per_group():
    g = torch.Generator().manual_seed(2)
    B, G = 4, 5
    J = torch.rand(B, G, G, generator=g, dtype=torch.float64)
    batched = spo.preference_rewards(J, spo.Args())
    per_group = torch.cat([spo.win_rates(spo.symmetrize(J[b])) for b in range(B)])
    assert torch.allclose(batched, per_group, atol=1e-15)
    scores = torch.randint(0, 3, (B, G), generator=g).double()  # ties included
    batched = spo.group_win_rates(spo.symmetrize(spo.rule_preference(scores)))
    loop = []
    for row in scores.tolist():  # loop reference: wins + ½ ties over the G − 1 others
        loop += [sum(1.0 if a > b else 0.5 if a == b else 0.0 for j, b in enumerate(row) if j != i) / (G - 1)
                 for i, a in enumerate(row)]
    assert batched.tolist() == pytest.approx(loop, abs=1e-12)


def test_group_of_one_and_shape_errors():
    assert spo.win_rates(torch.full((1, 1), 0.5)).tolist() == [0.5]
    assert spo.preference_rewards(torch.full((3, 1, 1), 0.5), spo.Args()).tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="square"):
        spo.win_rates(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[B, G, G\]"):
        spo.group_win_rates(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="probabilities"):
        spo.preference_rewards(torch.tensor([[0.5, 1.2], [0.0, 0.5]]), spo.Args())
    with pytest.raises(ValueError, match="probabilities"):
        spo.preference_rewards(torch.tensor([[0.5, float("nan")], [0.0, 0.5]]), spo.Args())


# ---------------------------------------------------------------------------------------------------------
# Pairs and judgments


@pytest.mark.parametrize("G", [1, 2, 3, 8])
def test_pair_counts(G):
    p, o = spo.pairs(G), spo.ordered_pairs(G)
    assert len(p) == G * (G - 1) // 2 and len(set(p)) == len(p) and all(i < j for i, j in p)
    assert len(o) == G * (G - 1) and set(o) == set(p) | {(j, i) for i, j in p}


def test_matrix_from_judgments_round_trip():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0])
    J = spo.rule_preference(scores).double()
    both = {(i, j): J[i, j].item() for i, j in spo.ordered_pairs(4)}
    assert torch.equal(spo.matrix_from_judgments(4, both), J)
    one = {(i, j): J[i, j].item() for i, j in spo.pairs(4)}  # one order only: completed as 1 − J_ij
    assert torch.equal(spo.matrix_from_judgments(4, one), J)
    reverse = {(j, i): J[j, i].item() for i, j in spo.pairs(4)}
    assert torch.equal(spo.matrix_from_judgments(4, reverse), J)


def test_matrix_from_judgments_with_a_biased_llm_judge():
    # a judge that says 0.9 for whatever is shown first on pair (0, 1), 0.7 / 0.5 on (0, 2) / (1, 2)
    judgments = {(0, 1): 0.9, (1, 0): 0.9, (0, 2): 0.7, (2, 0): 0.5, (1, 2): 0.4, (2, 1): 0.6}
    J = spo.matrix_from_judgments(3, judgments)
    P = spo.symmetrize(J)
    # P_01 = ½(0.9 + 1 − 0.9) = 0.5; P_02 = ½(0.7 + 1 − 0.5) = 0.6; P_12 = ½(0.4 + 1 − 0.6) = 0.4
    assert P[0, 1].item() == pytest.approx(0.5) and P[0, 2].item() == pytest.approx(0.6)
    assert P[1, 2].item() == pytest.approx(0.4)
    # win = [(0.5 + 0.6)/2, (0.5 + 0.4)/2, (0.4 + 0.6)/2] = [0.55, 0.45, 0.5]
    assert spo.win_rates(P).tolist() == pytest.approx([0.55, 0.45, 0.5])


def test_matrix_from_judgments_errors():
    with pytest.raises(ValueError, match=r"no judgment for pair \(1, 2\)"):
        spo.matrix_from_judgments(3, {(0, 1): 1.0, (0, 2): 0.0})
    with pytest.raises(ValueError, match="probability"):
        spo.matrix_from_judgments(2, {(0, 1): 1.5})
    with pytest.raises(ValueError, match="distinct"):
        spo.matrix_from_judgments(2, {(0, 0): 0.5, (0, 1): 1.0})
    with pytest.raises(ValueError, match="distinct"):
        spo.matrix_from_judgments(2, {(0, 2): 0.5})


# ---------------------------------------------------------------------------------------------------------
# Args in the recipe schema


def test_args_build_a_strict_rl_stage_schema():
    model = stage_args_model("spo_test", spo.Args, rl=True)  # asserts no clash with the shared RL args
    _, algo = split_args(model(), spo.Args, rl=True)
    assert algo == spo.Args() and algo.symmetrize is True
    _, algo = split_args(model(symmetrize=False), spo.Args, rl=True)
    assert algo.symmetrize is False
    with pytest.raises(ValidationError):
        model(no_such_arg=1)
