"""Built-in verifiers: plain functions, no torch. Installed as `posttrain.rewards` (see pyproject).

A built-in is written for one row, `f(completion, <columns it reads>, *, <settings>, **row) -> float | None`,
and `@per_row` turns it into the batch contract every verifier follows (TRL's reward-function signature):
`f(prompts, completions, completion_ids, **columns) -> list[float | None]`, where each dataset column arrives
by name as a list. In the per-row function the positional parameters after `completion` are the dataset columns
it needs (checked before scoring), keyword-only parameters are settings (the recipe's `kwargs`, bound with
functools.partial), `prompt` and `completion_ids` arrive with the row, and `**row` swallows everything else.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["per_row"]

_ROW_EXTRAS = ("prompt", "completion_ids")


def per_row(fn):
    """Lift a per-row verifier `fn(completion, **row) -> float | None` to the batch contract (see module doc)."""
    params = list(inspect.signature(fn).parameters.values())
    settings = tuple(
        p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _ROW_EXTRAS
    )
    columns = tuple(
        p.name for p in params[1:]
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
        and p.name not in _ROW_EXTRAS
    )

    @functools.wraps(fn)
    def batch(prompts=None, completions=(), completion_ids=None, **kwargs):
        n = len(completions)
        fixed = {k: v for k, v in kwargs.items() if k in settings}
        listed = {k: v for k, v in kwargs.items() if k not in settings}
        out = []
        for i, completion in enumerate(completions):
            row = {k: v[i] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in listed.items()}
            row["prompt"] = prompts[i] if prompts is not None else None
            row["completion_ids"] = completion_ids[i] if completion_ids is not None else None
            out.append(fn(completion, **row, **fixed))
        return out

    batch.__reward_settings__ = settings  # the recipe `kwargs` it accepts (checked when the Scorer is built)
    batch.__reward_columns__ = columns  # the dataset columns it reads (checked before scoring)
    return batch
