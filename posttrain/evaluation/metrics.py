"""Math benchmark metrics over n samples per problem. Pure Python; values are fractions in [0, 1].

pass@k  the unbiased estimator of Chen et al. (2021) from all n samples of a problem with c correct:
        `1 − C(n−c, k) / C(n, k)`, the chance that k samples drawn without replacement hold a correct one.
avg@k   the mean correctness of the first k samples (avg@n = the mean over all samples = pass@1's estimate).
maj@k   the majority answer of the first k samples is correct. Votes go to `vote_key(answer)` (a string
        normalisation, see there); samples without an extracted answer do not vote; ties go to the answer
        whose first vote came earliest (deterministic: sample order is the engine's output order); a problem
        where no sample has an answer counts as wrong. The majority answer's correctness is the verifier's
        score of the first sample that voted for it.
Each is averaged over problems; `macro_average` averages a metric over benchmarks.
"""

from __future__ import annotations

import math
import re

from posttrain.algorithms.voting import majority_index


def pass_at_k(n: int, c: int, k: int) -> float:
    """`1 − C(n−c, k)/C(n, k)`: P(at least one of k samples drawn from n, c of them correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def avg_at_k(correct: list[bool], k: int) -> float:
    """Mean correctness of the first k samples."""
    return sum(map(bool, correct[:k])) / k


_SPACES = re.compile(r"\s+")
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def vote_key(answer: str | None) -> str | None:
    """A normalised string for majority voting: `$`, spaces, `\\left`/`\\right`, `\\!` `\\,` `\\;` spacing,
    `\\dfrac`/`\\tfrac` → `\\frac`, `\\text{x}` → `x`; a plain number is written canonically (`1,000` → `1000`,
    `2.50` → `2.5`, `27.0` → `27`)."""
    if answer is None:
        return None
    text = str(answer).strip().strip("$").strip().rstrip(".")
    text = _WRAPPERS.sub(r"\1", text)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", "")):
        text = text.replace(old, new)
    text = _SPACES.sub("", text)
    if _NUMBER.fullmatch(text):
        value = float(text.replace(",", ""))
        text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return text or None


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """1.0 if the majority answer among the first k samples is correct (see module doc), else 0.0."""
    index = majority_index([vote_key(a) for a in answers[:k]])
    return float(index is not None and bool(correct[index]))


def problem_metrics(answers: list[str | None], correct: list[bool], ks: list[int]) -> dict[str, float]:
    """pass@k for every k in `ks` (k <= number of samples), and maj@k, avg@k for each k > 1 (at k = 1 both
    are the first sample's correctness, which pass@1 estimates with less variance)."""
    n, c = len(correct), sum(map(bool, correct))
    out = {}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        if k > 1:
            out[f"maj@{k}"] = maj_at_k(answers, correct, k)
            out[f"avg@{k}"] = avg_at_k(correct, k)
    return out


def benchmark_metrics(per_problem: list[dict[str, float]]) -> dict[str, float]:
    """The mean over problems of every metric."""
    if not per_problem:
        return {}
    return {name: sum(p[name] for p in per_problem) / len(per_problem) for name in per_problem[0]}


def macro_average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the benchmarks that report it (every benchmark weighs the same)."""
    names: dict[str, list[float]] = {}
    for metrics in results.values():
        for name, value in metrics.items():
            names.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in names.items()}
