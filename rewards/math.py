"""`math`: 1.0 when the completion's final answer equals the reference `answer` mathematically, else 0.0.

Where the final answer is found, in order:
1. `posttrain.rewards.extract`: the last `<answer>` tag, the `\\boxed{}` answers, or "the answer is X";
   several boxes hold one answer each and compare as a set (`\\boxed{2} and \\boxed{-3}` = `-3, 2`), on the
   reference's side too;
2. else math-verify's own extraction over the end of the completion (its LaTeX and plain-expression
   extraction: the last math expression, `$(2, 5]$`, `$x = 7$`, `1,250 dollars`);
3. else the math that ends the last sentence ("so the divisors are 1, 2, 5, 10."), and what follows its last
   `=` (a chain `\\sqrt{8} = 2\\sqrt{2}` is read as its last term);
4. else (when nothing above parses) the last number; and a reference that is only words (`\\text{odd}`, "Tuesday") matches a completion
   whose last sentence ends with those words.
Each reading is compared with the reference by math-verify (`parse` + `verify`: numbers within rounding,
`\\frac{1}{2}` = 0.5, symbolic equality, sets, intervals, matrices, `x = 5` against 5); an inequality in one
variable is also read as its interval (`x \\ge 4` = `[4, \\infty)`). When nothing parses, the two strings are
compared after whitespace is collapsed. The reference may be a bare answer, a `\\boxed{}` solution, or a GSM8K
solution ending in `#### 42`. A missing/empty reference abstains (None).

Agreement with the hand-labelled pairs of `tests/data/answer_pairs.jsonl` (266 pairs, 42 % wrong answers that
look close) is printed by `tests/test_answer_pairs.py`: 98.9 %, against 64.3 % for math-verify alone on the
same strings; 99.1 % of the wrong answers are rejected. On a second set written afterwards and never tuned on
(`answer_pairs_heldout.jsonl`, 120 pairs): 95.8 % against 65.8 %, every wrong answer rejected.

Timeouts: math-verify's own SIGALRM timeouts are switched off (they work only in a main thread). The Scorer runs
every call in a worker process with a hard timeout, which is the guard. Before that, answers that are known to
make sympy explode are compared as strings only: longer than `max_chars`, braces nested deeper than `max_depth`
(30 nested `\\frac` take minutes), power towers (`9^{9^{9}}`), exponents or factorials of 6+ digits. Steps 2
and 3 read only the last `max_chars` characters of the completion, from a line or sentence start.
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
from posttrain.rewards.extract import all_boxed, brace_pairs, find_answer, last_number

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
    return float(any(_matches(gold, completion, max_chars, max_depth) for gold in golds))


def _matches(gold: str, completion: str, max_chars: int, max_depth: int) -> bool:
    """Does the completion's final answer equal the reference `gold`? (the order of the module doc)"""
    gold_text, gold_latex = reference_latex(gold)
    pred, found_in = find_answer(completion, last_number_fallback=False)
    if pred is not None:  # a tag, box(es) or "the answer is"
        if found_in == "boxes":  # one answer per box: math-verify compares the boxes as a set
            latexes = [", ".join(f"\\boxed{{{b}}}" for b in pred.split(", "))]
        elif found_in == "boxed":
            latexes = [f"\\boxed{{{pred}}}"]
        else:  # free text ("the answer is 5 apples"): math-verify's extraction first, then the whole as LaTeX
            latexes = [pred, f"\\boxed{{{pred}}}"]
        return _same(gold_text, gold_latex, pred, latexes, max_chars, max_depth) or _same_words(gold_text, pred)
    # No tag, box or "answer is": math-verify's own extraction over the end of the completion (the last LaTeX
    # or plain math expression), then the expression that ends the last sentence, then the last number.
    tail = _BOLD.sub(r"\1", _tail(completion, max_chars))  # markdown **17** is not a Python power tower
    latexes = [_plain_numbers(tail), *(f"\\boxed{{{e}}}" for e in final_expressions(tail))]
    number = last_number(completion)
    if number is not None and not any(_parse(latex) for latex in latexes):  # nothing else read as math
        latexes.append(f"\\boxed{{{number}}}")
    return _same(gold_text, gold_latex, tail, latexes, max_chars, max_depth) or _ends_with_words(tail, gold_text)


def _same(gold: str, gold_latex: str, pred: str, pred_latexes: list[str], max_chars: int, max_depth: int) -> bool:
    """math-verify's `verify` of the reference against any reading of the prediction (an inequality in one
    variable also read as an interval); strings compared when either side is too risky for sympy."""
    if too_risky(gold, max_chars, max_depth) or too_risky(pred, max_chars, max_depth):
        return _normalise(gold) == _normalise(pred)
    gold_forms = [g for g in (_parse(gold_latex) or _parse(gold), _parse_interval(gold)) if g]
    for latex in pred_latexes:
        for pred_form in (_parse(latex), _parse_interval(latex)):
            if pred_form and any(verify(g, pred_form, timeout_seconds=None) for g in gold_forms):
                return True
    return _normalise(gold) == _normalise(pred)


def reference_latex(answer: str) -> tuple[str, str]:
    """(the reference's answer text, what math-verify parses): after the last `####` (GSM8K) the number;
    several `\\boxed{}` are one answer each (compared as a set); one box, its content; else the whole text."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].replace(",", "")
    boxes = all_boxed(answer)
    if len(boxes) > 1:
        return ", ".join(boxes), ", ".join(f"\\boxed{{{b}}}" for b in boxes)
    text = (boxes[0] if boxes else answer).strip()
    return text, f"\\boxed{{{text}}}"


def reference(answer: str) -> str:
    """The answer part of a reference (see `reference_latex`)."""
    return reference_latex(answer)[0]


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
    return parse(text.replace("\\varnothing", "\\emptyset"), extraction_config=_CONFIG, parsing_timeout=None)


_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_DIGIT_GROUPS = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\ |\\!|,(?=\d{3}(?!\d)))(?=\d{3}(?!\d))")


def _plain_numbers(text: str) -> str:
    """Thousands separators out of numbers (`86{,}400`, `10\\,000`, `1,048,576`) and `\\$` out of prices."""
    return _DIGIT_GROUPS.sub("", text.replace("\\$", ""))


_MATH_TOKEN = re.compile(r"\\[a-zA-Z]+|[a-zA-Z]+|\d+(?:\.\d+)?|\S")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z$\\])|\n")


def final_expressions(text: str) -> list[str]:
    """The math that ends the last sentence ("… so the divisors are 1, 2, 5, 10." → `1, 2, 5, 10`), and what
    follows its last `=` (`\\sqrt{8} = 2\\sqrt{2}` → `2\\sqrt{2}`): math-verify's extraction misses plain-text
    sets, intervals and lists, and reads a chain of equalities as one equation."""
    last = [s for s in _SENTENCE_END.split(_plain_numbers(text).strip()) if s.strip()]
    if not last:
        return []
    sentence = re.sub(r"\\[\[\]()]|\$", " ", last[-1]).strip().rstrip(".!?;:* ").strip()
    tokens = _MATH_TOKEN.findall(sentence)
    start = len(tokens)
    while start > 0:
        token = tokens[start - 1]
        if token.isalpha() and len(token) > 1 and token not in ("and", "or") and not _is_command(tokens, start - 1):
            break
        start -= 1
    while start < len(tokens) and tokens[start] in ("and", "or", ",", "."):
        start += 1
    if start == len(tokens):
        return []
    span = sentence[_offset(sentence, tokens, start):].strip()
    span = re.sub(r",?\s+(?:and|or)\s+", ", ", span)
    out = [span]
    if "=" in span and span.rsplit("=", 1)[1].strip():
        out.append(span.rsplit("=", 1)[1].strip())
    return out


def _is_command(tokens: list[str], i: int) -> bool:
    """A LaTeX command, or the environment name of `\\begin{pmatrix}` / `\\end{pmatrix}`."""
    return tokens[i].startswith("\\") or (i > 1 and tokens[i - 1] == "{" and tokens[i - 2] in ("\\begin", "\\end"))


def _offset(sentence: str, tokens: list[str], start: int) -> int:
    """Character offset of token `start` (tokens are found left to right without overlap)."""
    at = 0
    for token in tokens[:start]:
        at = sentence.index(token, at) + len(token)
    return sentence.index(tokens[start], at)


_INEQUALITY = re.compile(r"^\s*(?:(?P<lo>[^<>=]+?)\s*(?P<op1><|\\le(?:q)?|≤)\s*)?[a-zA-Z]\s*"
                         r"(?P<op2><|>|\\le(?:q)?|\\ge(?:q)?|≤|≥)\s*(?P<hi>[^<>=]+?)\s*$")


def _parse_interval(text: str) -> list:
    """An inequality in one variable (`x \\ge 4`, `1 < x \\le 7`) parsed as the interval it describes."""
    match = _INEQUALITY.match(text.replace("\\boxed{", "", 1)[:-1] if text.startswith("\\boxed{") else text)
    if not match:
        return []
    op2, bound = match["op2"], match["hi"]
    closed = op2 not in ("<", ">")
    if op2 in (">", "≥") or op2.startswith("\\ge"):
        if match["lo"]:
            return []
        interval = f"{'[' if closed else '('}{bound}, \\infty)"
    elif match["lo"]:
        low_closed = match["op1"] not in ("<",)
        interval = f"{'[' if low_closed else '('}{match['lo']}, {bound}{']' if closed else ')'}"
    else:
        interval = f"(-\\infty, {bound}{']' if closed else ')'}"
    return _parse(f"\\boxed{{{interval}}}")


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    return " ".join(text.split())


_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_WORDS = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")


def _words(text: str) -> str | None:
    """A reference or answer that is only words (`\\text{odd}`, "Tuesday", "no solution"), lowercased with
    LaTeX text macros, `$` and punctuation removed; None when it holds anything else (digits, math)."""
    plain = _TEXT_MACRO.sub(r"\1", text).replace("$", "").strip().strip(".!*").strip().lower()
    plain = " ".join(plain.split())
    return plain if plain and _WORDS.fullmatch(plain) else None


def _same_words(gold: str, pred: str) -> bool:
    """Both are only words and the same words (`\\text{Odd}` and "odd")."""
    words = _words(gold)
    return words is not None and words == _words(pred)


def _ends_with_words(text: str, gold: str) -> bool:
    """A word reference (see `_words`) that ends the completion's last sentence: "… so the number is odd."."""
    words = _words(gold)
    if words is None:
        return False
    last = re.split(r"(?<=[.!?])\s+", text.strip())[-1]
    last = " ".join(_TEXT_MACRO.sub(r"\1", last).replace("$", "").lower().split()).rstrip(".!*) ").strip()
    return re.search(rf"(?:^|[^a-z]){re.escape(words)}$", last) is not None


def _tail(text: str, max_chars: int) -> str:
    """The completion's last `max_chars` characters, from a line or sentence start (else a space) inside them, so
    that no expression is read from its middle; "" when the whole stretch is one unbroken token."""
    if len(text) <= max_chars:
        return text
    tail = text[-max_chars:]
    cut = re.search(r"\n|(?<=[.!?])\s", tail) or re.search(r"\s", tail)
    return tail[cut.end():] if cut else ""
