"""pass@k, maj@k, avg@k: the unbiased estimator against brute-force enumeration, majority ties, normalisation."""

import itertools

import pytest

from posttrain.evaluation.metrics import (avg_at_k, benchmark_metrics, macro_average, maj_at_k, majority_index,
                                          pass_at_k, problem_metrics, vote_key)


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(5, 2, 4) == 1.0  # n − c < k: every 4-subset holds a correct sample
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_at_k_is_the_mean_of_the_first_k():
    assert avg_at_k([True, False, True, True], 4) == 0.75
    assert avg_at_k([True, False, True, True], 2) == 0.5


def test_maj_at_k_ties_go_to_the_answer_voted_first():
    # "3" and "4" both get two votes; "3" was voted first → the majority is "3" (correct)
    assert maj_at_k(["3", "4", "4", "3"], [True, False, False, True], 4) == 1.0
    assert maj_at_k(["4", "3", "3", "4"], [False, True, True, False], 4) == 0.0
    # a clear majority wins over the first vote
    assert maj_at_k(["4", "3", "3", "3"], [False, True, True, True], 4) == 1.0
    # only the first k samples vote
    assert maj_at_k(["4", "4", "3", "3", "3"], [False, False, True, True, True], 2) == 0.0
    assert maj_at_k(["4", "4", "3", "3", "3"], [False, False, True, True, True], 5) == 1.0


def test_maj_at_k_without_answers_is_wrong_and_unanswered_samples_do_not_vote():
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    assert majority_index([None, "5", None]) == 1
    assert maj_at_k([None, None, "5"], [False, False, True], 3) == 1.0


def test_vote_key_normalises_equal_spellings():
    assert vote_key("1,000") == vote_key("1000") == "1000"
    assert vote_key("27.0") == vote_key("27") and vote_key("2.50") == vote_key("2.5")
    assert vote_key("$\\dfrac{1}{2}$") == vote_key("\\frac{1}{2}") == vote_key("\\frac {1} {2}")
    assert vote_key("\\left( 1, 2 \\right)") == vote_key("(1,2)")
    assert vote_key("\\text{Tuesday}") == vote_key("Tuesday")
    assert vote_key("30^\\circ") == vote_key("30")
    assert vote_key("3") != vote_key("4") and vote_key(None) is None and vote_key("  ") is None
    # majority voting uses it: "1,000" and "1000" are one answer with 2 votes against "999"
    assert maj_at_k(["999", "1,000", "1000"], [False, True, True], 3) == 1.0


def test_problem_and_benchmark_metrics():
    per = problem_metrics(["5", "5", "6", None], [True, True, False, False], [1, 2, 4])
    assert per["pass@1"] == 0.5 and per["pass@4"] == 1.0
    assert per["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 − C(2,2)/C(4,2)
    assert per["maj@4"] == 1.0 and per["avg@4"] == 0.5 and per["avg@2"] == 1.0
    assert "maj@1" not in per and "avg@1" not in per  # pass@1 estimates the same thing with less variance
    bench = benchmark_metrics([{"pass@1": 1.0}, {"pass@1": 0.0}, {"pass@1": 0.5}])
    assert bench == {"pass@1": 0.5}
    assert macro_average({"a": {"pass@1": 0.2}, "b": {"pass@1": 0.6, "pass@4": 0.9}}) == {"pass@1": 0.4, "pass@4": 0.9}
