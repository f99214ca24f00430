"""Answer equivalence through the `math` verifier as training and evaluation run it (the Scorer: worker
processes, per-row timeout): the hard cases of math benchmarks, and adversarial answers that must neither hang
nor crash grading."""

import time

import pytest

from posttrain.reward import RewardSpec, Scorer

B = lambda s: f"So the result is \\boxed{{{s}}}."
CASES = [
 # fractions / decimals
 (B("\\frac12"), "0.5", 1), (B("0.5"), "\\frac{1}{2}", 1), (B("1/2"), "\\frac{1}{2}", 1), (B("\\dfrac{3}{4}"), "0.75", 1),
 (B("\\tfrac13"), "\\frac{1}{3}", 1), (B("-\\frac{1}{2}"), "-0.5", 1), (B("0.333"), "\\frac13", 0), (B("2/4"), "\\frac12", 1),
 (B("\\frac{6}{8}"), "\\frac34", 1), (B("1.5"), "\\frac32", 1), (B("0.25"), "\\frac{1}{5}", 0), (B("\\frac{7}{2}"), "3.5", 1),
 # multiple choice
 (B("\\text{(B)}"), "B", 1), (B("B"), "\\text{(B)}", 1), (B("(C)"), "C", 1), (B("\\textbf{(E)}"), "E", 1), (B("A"), "B", 0),
 ("The answer is (D).", "D", 1), (B("\\text{(A)}"), "C", 0), (B("D"), "(D)", 1),
 # intervals
 (B("[1, 3)"), "[1,3)", 1), (B("(1,3]"), "[1,3)", 0), (B("(-\\infty, 2]"), "(-\\infty,2]", 1), (B("[0,1]"), "[0, 1]", 1),
 (B("(0,1)"), "[0,1]", 0), (B("(-\\infty,0)\\cup(1,\\infty)"), "(-\\infty, 0) \\cup (1, \\infty)", 1),
 # sets
 (B("\\{1,2,3\\}"), "\\{3,2,1\\}", 1), (B("\\{1,2\\}"), "\\{1,2,3\\}", 0), (B("\\{-1, 1\\}"), "\\{1,-1\\}", 1),
 # tuples
 (B("(1,2)"), "(1, 2)", 1), (B("(2,1)"), "(1,2)", 0), (B("(3, -4)"), "(3,-4)", 1), (B("(1,2,3)"), "(1,2,3)", 1),
 (B("(0, \\frac{1}{2})"), "(0,0.5)", 1),
 # units and degrees
 (B("30^\\circ"), "30", 1), (B("30^{\\circ}"), "30^\\circ", 1), (B("5\\text{ cm}"), "5", 1), (B("12 \\text{ meters}"), "12", 1),
 (B("45^\\circ"), "45", 1), (B("45^\\circ"), "60", 0), (B("7\\,\\text{m}"), "7", 1), (B("3 \\mbox{ inches}"), "3", 1),
 (B("100\\text{ km/h}"), "100", 1),
 # thousands separators
 (B("1,000"), "1000", 1), (B("1{,}000"), "1000", 1), ("The answer is 1,234,567.", "1234567", 1), (B("10,000"), "10000", 1),
 (B("1,000"), "100", 0), (B("12,345.6"), "12345.6", 1),
 # x = 3 vs 3
 (B("x = 3"), "3", 1), (B("3"), "x=3", 1), (B("x=3"), "4", 0), (B("y = 2x+1"), "2x+1", 1), (B("k=-2"), "-2", 1),
 # symbolic
 (B("x^2+2x+1"), "(x+1)^2", 1), (B("\\sqrt{2}/2"), "\\frac{\\sqrt2}{2}", 1), (B("2\\sqrt{2}"), "\\sqrt{8}", 1),
 (B("\\pi"), "3.14159", 0), (B("2\\pi"), "2\\pi", 1), (B("\\frac{\\pi}{2}"), "\\pi/2", 1), (B("3\\sqrt{3}"), "\\sqrt{27}", 1),
 (B("x^2-1"), "(x-1)(x+1)", 1), (B("x^2+1"), "(x+1)^2", 0), (B("\\sqrt{3}"), "1.732", 0), (B("e^2"), "e^{2}", 1),
 (B("\\log_2 8"), "3", 1), (B("2^{10}"), "1024", 1), (B("10!"), "3628800", 1), (B("\\binom{5}{2}"), "10", 1),
 # gsm8k-style references
 (B("18"), "Janet sells 16 - 3 - 4 = 9 duck eggs.\n#### 18", 1), (B("19"), "so\n#### 18", 0),
 (B("1000"), "step\n#### 1,000", 1), ("She makes $18 every day. The answer is 18", "#### 18", 1),
 # minerva-style references (last boxed of a solution)
 (B("4.5"), "Thus $d = \\boxed{4.5}$ cm.", 1), (B("4.6"), "Thus $d = \\boxed{4.5}$ cm.", 0),
 # percent / dollars
 (B("50\\%"), "50", 1), (B("\\$18"), "18", 1), (B("\\$18.00"), "18", 1), (B("25\\%"), "0.25", 1),
 # negative numbers
 (B("-5"), "-5.0", 1), (B("-5"), "5", 0), (B("-0"), "0", 1),
 # extraction
 ("<answer>42</answer>", "42", 1), ("The final answer is 42", "42", 1), ("so we get 7 apples", "7", 1),
 (B("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", 1), # several boxes hold one answer each and compare as a set, on either side (issue 18)
 ("first \\boxed{3} then \\boxed{5}", "5", 0), ("first \\boxed{3} then \\boxed{5}", "3", 0),
 ("first \\boxed{3} then \\boxed{5}", "5, 3", 1), ("\\boxed{5} so again \\boxed{5}", "5", 1),
 ("The roots are \\boxed{2} and \\boxed{-3}.", "\\boxed{-3}, \\boxed{2}", 1), (B("2, -3"), "\\boxed{-3}, \\boxed{2}", 1),
 (B("2"), "\\boxed{-3}, \\boxed{2}", 0), ("I don't know.", "5", 0), ("", "5", 0), ("\\boxed{}", "5", 0),
 ("<answer>\\boxed{12}</answer>", "12", 1), ("<answer>12</answer> and 13", "12", 1), ("Answer: \\boxed 7", "7", 1),
 # matrices and lists
 (B("\\begin{pmatrix}1\\\\2\\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1),
 (B("\\begin{pmatrix}1\\\\3\\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 0),
 (B("1, 2"), "1,2", 1), (B("2, 1"), "1, 2", 1), (B("3"), ["2", "3"], 1), (B("4"), ["2", "3"], 0),
 # text answers
 (B("\\text{Tuesday}"), "\\text{Tuesday}", 1), (B("\\text{Monday}"), "\\text{Tuesday}", 0),
 # float rounding
 (B("0.3333333"), "\\frac13", 1), (B("3.14"), "3.14", 1), (B("1\\times10^3"), "1000", 1), (B("10^3"), "1000", 1),
]
ADVERSARIAL = [
 B("10^{10^{10}}"), B("9^9^9"), B("2^{9999999}"), B("1000000!"), B("\\frac{" * 40 + "1" + "}{2}" * 40),
 B("9" * 10000), B("(" * 5000), "\\boxed{" * 3000, B("x" * 10000), B("\\sqrt{" * 200 + "2" + "}" * 200),
 B("10^{10^{10^{10}}}"), B("(((((((((x+1)^2)^2)^2)^2)^2)^2)^2)^2)^2"),
 # unboxed: math-verify's extraction over the completion's end, and the expression ending the last sentence
 "So we get $10^{10^{10}}$.", "Thus x = " + "\\frac{" * 40 + "1" + "}{2}" * 40 + ".", "Hence the value is " + "9" * 10000 + ".",
 "It equals (" + "(x+1)^2" * 300 + ").", "so x = " + "1, " * 3000 + "2.",
]


def _score(completions, references, timeout=10.0):
    with Scorer([RewardSpec(name="math", timeout=timeout)]) as scorer:
        result = scorer.score(None, completions, None, {"answer": references})
    return result


def test_answer_equivalence_table():
    assert len(CASES) >= 100
    result = _score([c for c, _, _ in CASES], [r for _, r, _ in CASES])
    got = result.per_reward["math"]
    wrong = [(c, r, e, g) for (c, r, e), g in zip(CASES, got) if g != e]
    assert not wrong, wrong
    assert result.failures["math"] == 0 and result.timeouts["math"] == 0


def test_adversarial_answers_are_graded_or_time_out_cleanly():
    """Power towers, 6+-digit exponents/factorials, 40 nested fractions, 10k characters, unbalanced braces:
    each row comes back (0.0, or the fallback after its timeout) and the run goes on."""
    started = time.perf_counter()
    result = _score(ADVERSARIAL + [B("42")], ["1"] * len(ADVERSARIAL) + ["42"], timeout=2.0)
    elapsed = time.perf_counter() - started
    scores = result.per_reward["math"]
    assert scores[:-1] == [0.0] * len(ADVERSARIAL)
    assert scores[-1] == 1.0  # the pool is still healthy after them
    assert result.failures["math"] == 0
    # every row either finished or was stopped at its 2 s timeout: never more than that per row
    assert elapsed < 2.0 * (len(ADVERSARIAL) + 1) + 30
