"""`math`: 1.0 when the completion's final answer equals the reference `answer` mathematically, else 0.0.

The answer is found with `posttrain.rewards.extract` (last `<answer>` tag, last `\\boxed{}`, "the answer is X",
else the last number) and compared with the math-verify package (`parse` + `verify`: numbers within rounding,
`\\frac{1}{2}` = 0.5, symbolic equality, sets, intervals, matrices, `x = 5` against 5). When either side does
not parse, the two strings are compared after whitespace is collapsed. The reference may be a bare answer,
a `\\boxed{}` solution, or a GSM8K solution ending in `#### 42`. A missing/empty reference abstains (None).

Timeouts: math-verify's own SIGALRM timeouts are switched off (they work only in a main thread). The Scorer runs
every call in a worker process with a hard timeout, which is the guard. Before that, answers that are known to
make sympy explode are compared as strings only: longer than `max_chars`, braces nested deeper than `max_depth`
(30 nested `\\frac` take minutes), power towers (`9^{9^{9}}`), exponents or factorials of 6+ digits.
"""

from __future__ import annotations

import re

try:
    import math_verify.grader
    import math_verify.parser
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the `math` reward needs the math-verify package: pip install math-verify") from err

from posttrain.rewards import per_row
from posttrain.rewards.extract import brace_pairs, find_answer, last_boxed

# We pass timeout=None on purpose (see module doc): silence math-verify's "timeout is disabled" warning.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
# power towers (9^9^9, 9**9**9), exponents or factorials with 6+ digits
_TOWER = re.compile(r"\^\s*[\w.]+\s*\^|\*\*\s*[\w.]+\s*\*\*|(?:\^|\*\*)\s*\{?\s*\d{6,}|\d{6,}\s*\}?\s*!")


@per_row
def math_reward(completion: str, answer, *, max_chars: int = 1000, max_depth: int = 10, **row) -> float | None:
    """1.0 if the final answer of `completion` equals `answer` (see module doc), 0.0 if not, None without one.

    `answer` may also be a list of acceptable answers (1.0 if any matches).
    """
    golds = [str(a) for a in (answer if isinstance(answer, (list, tuple)) else [answer])
             if a is not None and str(a).strip()]
    if not golds:
        return None
    pred, found_in = find_answer(completion)
    if pred is None:
        return 0.0
    return float(any(_equal(reference(gold), pred, found_in, max_chars, max_depth) for gold in golds))


def _equal(gold: str, pred: str, found_in: str, max_chars: int, max_depth: int) -> bool:
    if too_risky(gold, max_chars, max_depth) or too_risky(pred, max_chars, max_depth):
        return _normalise(gold) == _normalise(pred)
    gold_parsed = _parse(f"\\boxed{{{gold}}}") or _parse(gold)
    if found_in == "boxed":
        pred_parsed = _parse(f"\\boxed{{{pred}}}")
    else:  # free text ("the answer is 5 apples"): let math-verify find the expression in it first
        pred_parsed = _parse(pred) or _parse(f"\\boxed{{{pred}}}")
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True
    return _normalise(gold) == _normalise(pred)


def reference(answer: str) -> str:
    """The answer part of a reference: after the last `####` (GSM8K), inside the last `\\boxed{}`, else all."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].replace(",", "")
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()


def too_risky(expr: str, max_chars: int = 1000, max_depth: int = 10) -> bool:
    """True for input known to hang or blow up sympy; such answers are compared as strings."""
    if len(expr) > max_chars or _TOWER.search(expr):
        return True
    pairs = brace_pairs(expr)
    closes = set(pairs.values())
    depth = 0
    for i, c in enumerate(expr):
        if i in pairs:
            depth += 1
            if depth > max_depth:
                return True
        elif i in closes:
            depth -= 1
        elif c == "^":  # an exponent that itself holds an exponent: 9^{9^{9}}
            j = i + 1
            while j < len(expr) and expr[j] == " ":
                j += 1
            if j in pairs and "^" in expr[j : pairs[j]]:
                return True
    return False


def _parse(text: str) -> list:
    return parse(text, extraction_config=_CONFIG, parsing_timeout=None)


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    return " ".join(text.split())
