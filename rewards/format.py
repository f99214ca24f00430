"""`format`: 1.0 when the completion has the required shape, else 0.0.

Default: the R1 shape, `<think>...</think>` then `<answer>...</answer>` and nothing else but whitespace, each tag
exactly once (`tags` changes the tag names, in order). `pattern` replaces that with your own regular expression,
matched against the whole completion (`re.fullmatch`, `re.DOTALL`; `search=True` finds it anywhere instead).
`prefix` is put in front of the completion first: use `prefix="<think>"` when the chat template already opens
the think block in the prompt.
"""

from __future__ import annotations

import functools
import re

from posttrain.rewards import per_row

DEFAULT_TAGS = ("think", "answer")


@functools.lru_cache(maxsize=64)
def tags_pattern(tags: tuple[str, ...]) -> re.Pattern:
    """`\\s*<a>…</a>\\s*<b>…</b>\\s*` where no block holds another opening or closing tag of its own name."""
    blocks = [f"<{t}>(?:(?!</?{t}>).)*</{t}>" for t in map(re.escape, tags)]
    return re.compile(r"\s*" + r"\s*".join(blocks) + r"\s*", re.DOTALL)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


@per_row
def format_reward(completion: str, *, pattern: str | None = None, tags=DEFAULT_TAGS, search: bool = False,
                  prefix: str = "", **row) -> float:
    """1.0 if `prefix + completion` has the shape (see module doc), else 0.0."""
    regex = _compiled(pattern) if pattern is not None else tags_pattern(tuple(tags))
    text = prefix + completion
    match = regex.search(text) if search else regex.fullmatch(text)
    return 1.0 if match else 0.0
