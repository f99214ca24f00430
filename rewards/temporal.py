"""`temporal_iou`: temporal IoU of the span a completion names with the ground-truth span; 0.0 when none parses.

One parser serves the training reward and the video-grounding evaluation, so they never disagree:

* the region searched is the last complete `<answer>...</answer>` when there is one, else the whole text;
* a span is two times joined by `to`, `-`, `–`, `~`, `and` or `,` (`12.3 to 20.1`, `from 12.3s to 20.1s`,
  `[12.3, 20.1]`, `01:05 - 01:20`); a time is seconds (`12.3`, `12.3s`, `12.3 sec`) or `mm:ss` / `hh:mm:ss`
  (fractions allowed: `1:05.5`);
* the LAST span in the region is the answer (a model's reasoning may mention others first);
* a span given backwards (`20 to 12`) is read as `[12, 20]`.

IoU follows the official QVHighlights / Moment-DETR evaluation: `|a ∩ b| / (max(ends) − min(starts))`, which is
the true union whenever the spans overlap and gives 0 when they do not; 0 when that union is empty.
Linear-time regexes on bounded text: no input can hang it.
"""

from __future__ import annotations

import re

from posttrain.rewards import per_row
from posttrain.rewards.extract import answer_tag

_TIME = r"(?:\d+:)?\d+:\d+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
_UNIT = r"(?:\s*(?:seconds|second|secs|sec|s)\b)?"
_JOIN = r"\s*(?:to|and|-|–|—|~|,)\s*"
SPAN = re.compile(rf"(?<![\d.:])({_TIME}){_UNIT}{_JOIN}({_TIME}){_UNIT}(?![\d:])", re.IGNORECASE)
MAX_CHARS = 20_000  # a longer completion is searched in its last MAX_CHARS characters only


def seconds(text: str) -> float:
    """`12.5` → 12.5, `1:05` → 65.0, `1:02:03.5` → 3723.5."""
    value = 0.0
    for part in text.split(":"):
        value = value * 60 + float(part)
    return value


def parse_span(text) -> tuple[float, float] | None:
    """The (start, end) seconds a completion names (see module doc), a `[start, end]` pair as is, else None."""
    if isinstance(text, (list, tuple)):
        if len(text) >= 2 and all(isinstance(v, (int, float)) for v in text[:2]):
            return (float(min(text[:2])), float(max(text[:2])))
        return None
    if not isinstance(text, str):
        return None
    text = text[-MAX_CHARS:]
    tagged = answer_tag(text)
    region = tagged if tagged is not None else text
    last = None
    for last in SPAN.finditer(region):
        pass
    if last is None:
        return None
    a, b = seconds(last.group(1)), seconds(last.group(2))
    return (min(a, b), max(a, b))


def temporal_iou(a, b) -> float:
    """IoU of spans `a` and `b` ([start, end] seconds), as the official Moment-DETR evaluation computes it."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


@per_row
def temporal_iou_reward(completion: str, span, **row) -> float | None:
    """IoU of the completion's span with the ground-truth `span` column ([start, end] seconds); 0.0 if the
    completion names no span; None (abstain) without a ground truth."""
    gold = parse_span(span)
    if gold is None:
        return None
    pred = parse_span(completion)
    return 0.0 if pred is None else temporal_iou(pred, gold)
