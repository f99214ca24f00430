"""A test verifier whose rewards vary on a random-init model's samples (the share of digit characters), so a
few GRPO steps move the weights: `tests/scripts/digit_share.py:digit_share`."""


def digit_share(prompts, completions, completion_ids, **columns) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
