"""`exact`: 1.0 when the completion's answer equals the reference `answer` as a string, else 0.0.

The answer is the one `posttrain.rewards.extract` finds (last `<answer>` tag, last `\\boxed{}`, "the answer is X";
no last-number guess), else the whole completion. Both sides are normalised: whitespace collapsed to single
spaces and stripped (and lower-cased with `ignore_case=True`). `answer` may be a list of acceptable answers.
A missing reference abstains (None).
"""

from __future__ import annotations

from posttrain.rewards import per_row
from posttrain.rewards.extract import extract_answer


def normalise(text, ignore_case: bool = False) -> str:
    text = " ".join(str(text).split())
    return text.lower() if ignore_case else text


@per_row
def exact_reward(completion: str, answer, *, ignore_case: bool = False, extract: bool = True, **row) -> float | None:
    """1.0 if the (extracted, else whole) completion equals `answer` (or one of a list) when normalised."""
    golds = [a for a in (answer if isinstance(answer, (list, tuple)) else [answer]) if a is not None]
    if not golds:
        return None
    found = extract_answer(completion, last_number_fallback=False) if extract else None
    pred = normalise(completion if found is None else found, ignore_case)
    return float(any(pred == normalise(gold, ignore_case) for gold in golds))
