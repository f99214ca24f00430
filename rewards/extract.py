"""Find the final answer in a completion. Plain string scanning: linear time, no regex backtracking, no sympy.

Where the answer is looked for, in order:
1. inside the last complete `<answer>...</answer>` (when there is one, the search below is limited to it);
2. the complete `\\boxed{...}` / `\\fbox{...}` (braces nested to any depth, `\\{` `\\}` skipped); several boxes
   hold one answer each and are joined with ", " (repeats dropped);
3. after the last "the answer is" / "final answer:" up to the end of that line, trailing "." dropped;
4. inside answer tags: the whole tag content; otherwise (only when `last_number=True`) the last number.
"""

from __future__ import annotations

import re

BOXED = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(r"(?:final answer|the answer)(?:\s+is)?\s*[:：]?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for match in pattern.finditer(text):
        last = match
    return last


def brace_pairs(text: str) -> dict[int, int]:
    """Map the index of every balanced `{` to its closing `}` (backslash-escaped braces skipped); one pass."""
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def all_boxed(text: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in order, boxes inside a
    box not counted on their own, repeats dropped (a model that boxes its answer twice gave one answer)."""
    starts = sorted((m.start(), cmd) for cmd in BOXED for m in re.finditer(re.escape(cmd), text))
    pairs, found, end = None, [], -1
    for start, cmd in starts:
        if start < end:  # inside the previous box
            continue
        i = start + len(cmd)
        while i < len(text) and text[i] in " \t":
            i += 1
        content = None
        if i < len(text) and text[i] == "{":
            pairs = brace_pairs(text) if pairs is None else pairs
            if i in pairs:
                content, end = text[i + 1 : pairs[i]].strip(), pairs[i]
        elif i > start + len(cmd):  # `\\boxed 5`: one token after a space
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                content, end = token.group(0).strip(), i + token.end()
        if content and content not in found:
            found.append(content)
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), else None."""
    boxes = all_boxed(text)
    return boxes[-1] if boxes else None


def answer_tag(text: str, tag: str = "answer") -> str | None:
    """Content of the last complete `<tag>...</tag>`, else None (an unclosed tag means a truncated answer)."""
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    end = text.rfind(close_tag)
    start = text.rfind(open_tag, 0, end) if end != -1 else -1
    return text[start + len(open_tag) : end].strip() if start != -1 else None


def answer_is(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer:" on its line, without a trailing period."""
    last = _last_match(_ANSWER_IS, text)
    if last is None:
        return None
    rest = text[last.end() :].lstrip()
    line = rest.split("\n", 1)[0].strip()
    line = line.rstrip(".。 ").strip("*").rstrip(".。 ").strip()  # "**42**." -> "42"
    return line or None


def last_number(text: str) -> str | None:
    """The last number (`-1,234.5`, `3/4`, `.5`) in the text with thousands separators removed, else None."""
    last = _last_match(_NUMBER, text)
    return last.group(0).replace(",", "") if last else None


def find_answer(text: str, *, last_number_fallback: bool = True) -> tuple[str | None, str]:
    """(final answer, where it was found: "boxed" | "boxes" | "answer_is" | "tag" | "number" | "") — order in module doc."""
    tagged = answer_tag(text)
    region = tagged if tagged is not None else text
    boxes = all_boxed(region)
    if boxes:  # several boxes hold one answer each: "2, -3" (compared as a set by the `math` verifier)
        return ", ".join(boxes), "boxed" if len(boxes) == 1 else "boxes"
    found = answer_is(region)
    if found:
        return found, "answer_is"
    if tagged is not None:
        return (tagged, "tag") if tagged else (None, "")
    found = last_number(text) if last_number_fallback else None
    return (found, "number") if found else (None, "")


def extract_answer(text: str, *, last_number_fallback: bool = True) -> str | None:
    """The final answer of a completion (see the module docstring for the order), or None if there is none."""
    return find_answer(text, last_number_fallback=last_number_fallback)[0]
