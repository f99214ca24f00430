"""Majority voting over extracted answers: shared by TTCS's pseudo-labels and the maj@k metric. Pure Python."""

from __future__ import annotations

from collections import Counter


def majority_index(keys: list[str | None]) -> int | None:
    """Index of the first sample voting for the most common key (ties: the key voted for first); None if no
    sample has a key."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, key in enumerate(keys):
        if key is not None and counts[key] == best:
            return i
    return None  # unreachable
