"""`length`: DAPO's overlong reward shaping (Yu et al. 2025, "DAPO", eq. 13), a penalty added to the task reward.

With L = len(completion_ids) tokens, L_max = `max_tokens` and L_cache = `cache`:

    R = 0                              if L <= L_max - L_cache
    R = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max   (falls linearly from 0 to -1)
    R = -1                             if L > L_max

Defaults are the paper's (L_max 20480, L_cache 4096): L = 18000 gives (16384 - 18000) / 4096 = -0.394531.
Needs `completion_ids` (the Scorer passes the sampler's token ids); without them the call fails.
"""

from __future__ import annotations

from posttrain.rewards import per_row


def overlong_penalty(length: int, max_tokens: int = 20480, cache: int = 4096) -> float:
    """R_length for a completion of `length` tokens (see module doc)."""
    if not 0 < cache <= max_tokens:
        raise ValueError(f"length reward needs 0 < cache <= max_tokens, got cache={cache}, max_tokens={max_tokens}")
    start = max_tokens - cache
    if length <= start:
        return 0.0
    if length <= max_tokens:
        return (start - length) / cache
    return -1.0


@per_row
def length_reward(completion: str, *, max_tokens: int = 20480, cache: int = 4096, completion_ids=None,
                  **row) -> float:
    """DAPO overlong penalty of one completion, from its token count."""
    if completion_ids is None:
        raise ValueError("the length reward needs completion_ids (token ids of the completion); none were given")
    return overlong_penalty(len(completion_ids), max_tokens, cache)
