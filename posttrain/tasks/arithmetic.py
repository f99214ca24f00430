"""Deterministic generator for the quickstart arithmetic task.

Each row is an integer expression over small non-negative operands with `+`, `-` and `*` and the usual
precedence (`*` binds tighter, then left to right), written without spaces and ending in `=`:

    {"prompt": "12+7*3=", "completion": "33", "answer": "33"}

The answer is `str(int)` of the exact value, so it may be negative (`"3-4*5="` -> `"-17"`). The defaults
keep the task small enough that a ~0.5M-parameter transformer trained from scratch with SFT reaches high
exact-match accuracy in about a minute on a CPU: operands 0..20, 2 or 3 operands, at most one `*`.

Command line (writes train.jsonl, test.jsonl, corpus.txt and README.md):

    python -m posttrain.tasks.arithmetic --out data/quickstart [--n-train 20000 --n-test 500 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

MAX_OPERAND = 20
MIN_OPERANDS = 2
MAX_OPERANDS = 3
OPS = "+-*"
MAX_MUL = 1


def evaluate(prompt: str) -> int:
    """The exact integer value of `prompt` ("12+7*3=" or "12+7*3"), with `*` before `+`/`-`."""
    expr = prompt.rstrip("=")
    terms, sign, current = [], 1, ""
    for ch in expr + "+":
        if ch in "+-":
            terms.append(sign * _product(current))
            sign, current = (1 if ch == "+" else -1), ""
        else:
            current += ch
    return sum(terms)


def _product(term: str) -> int:
    """The value of a `*`-separated run of non-negative integers."""
    value = 1
    for factor in term.split("*"):
        if not factor.isdigit():
            raise ValueError(f"not an arithmetic expression term: {term!r}")
        value *= int(factor)
    return value


def _expression(rng: random.Random, max_operand: int, min_operands: int, max_operands: int,
                ops: str, max_mul: int | None) -> str:
    """One random expression string without the trailing `=`."""
    k = rng.randint(min_operands, max_operands)
    parts = [str(rng.randint(0, max_operand))]
    n_mul = 0
    for _ in range(k - 1):
        allowed = [op for op in ops if op != "*" or max_mul is None or n_mul < max_mul]
        op = rng.choice(allowed)
        n_mul += op == "*"
        parts += [op, str(rng.randint(0, max_operand))]
    return "".join(parts)


def make_row(expression: str) -> dict:
    """One row {prompt, completion, answer} for an expression without the trailing `=`."""
    answer = str(evaluate(expression))
    return {"prompt": expression + "=", "completion": answer, "answer": answer}


def make_rows(n: int, seed: int = 0, *, max_operand: int = MAX_OPERAND, min_operands: int = MIN_OPERANDS,
              max_operands: int = MAX_OPERANDS, ops: str = OPS, max_mul: int | None = MAX_MUL,
              unique: bool = True) -> list[dict]:
    """`n` random rows with columns prompt, completion and answer, deterministic in `seed`.

    With `unique=True` (the default) no prompt appears twice; a `ValueError` is raised when the space of
    expressions is too small to give `n` distinct prompts.
    """
    if not 1 <= min_operands <= max_operands:
        raise ValueError(f"need 1 <= min_operands <= max_operands, got {min_operands}, {max_operands}")
    if not ops or set(ops) - set(OPS):
        raise ValueError(f"ops must be a non-empty subset of {OPS!r}, got {ops!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    attempts, max_attempts = 0, 50 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct expressions (got {len(rows)}): widen the ranges")
        expr = _expression(rng, max_operand, min_operands, max_operands, ops, max_mul)
        if unique and expr in seen:
            continue
        seen.add(expr)
        rows.append(make_row(expr))
    return rows


def make_splits(out_dir, n_train: int = 20000, n_test: int = 500, seed: int = 0, **kwargs) -> dict[str, Path]:
    """Write train.jsonl, test.jsonl, corpus.txt and README.md to `out_dir`; return their paths by name.

    Prompts are distinct across (and within) the splits, so every test prompt is unseen in training.
    `kwargs` go to `make_rows` (max_operand, min_operands, max_operands, ops, max_mul).
    """
    rows = make_rows(n_train + n_test, seed, unique=True, **kwargs)
    random.Random(seed + 1).shuffle(rows)
    test, train = rows[:n_test], rows[n_test:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl",
             "corpus": out / "corpus.txt", "readme": out / "README.md"}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["test"], test)
    paths["corpus"].write_text("".join(r["prompt"] + r["completion"] + "\n" for r in train))
    paths["readme"].write_text(_readme(out, n_train, n_test, seed, kwargs))
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, keys in column order."""
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _readme(out: Path, n_train: int, n_test: int, seed: int, kwargs: dict) -> str:
    """The dataset card written next to the splits."""
    cfg = {"max_operand": MAX_OPERAND, "min_operands": MIN_OPERANDS, "max_operands": MAX_OPERANDS,
           "ops": OPS, "max_mul": MAX_MUL, **kwargs}
    cmd = f"python -m posttrain.tasks.arithmetic --out {out.as_posix()} --n-train {n_train} --n-test {n_test} --seed {seed}"
    for key in ("max_operand", "min_operands", "max_operands", "ops", "max_mul"):
        if key in kwargs:
            cmd += f" --{key.replace('_', '-')} {kwargs[key]}"
    return f"""# Arithmetic quickstart task

Integer expressions over small non-negative operands with `+`, `-`, `*` and standard precedence
(`*` first, then left to right). The model reads the prompt and must write the exact value.

| column | example | meaning |
|---|---|---|
| `prompt` | `12+7*3=` | the expression, no spaces, ending in `=` |
| `completion` | `33` | the target text for SFT: `str(int)` of the value (may be negative, e.g. `-17`) |
| `answer` | `33` | same as `completion`; the reference for exact-match rewards and evaluation |

Files:

- `train.jsonl`: {n_train} rows; `test.jsonl`: {n_test} rows. All prompts are distinct, so no test prompt
  appears in training.
- `corpus.txt`: one line per training row, `prompt + completion` (e.g. `12+7*3=33`), for training a tokenizer.

Generation settings: operands 0..{cfg['max_operand']}, {cfg['min_operands']} to {cfg['max_operands']} operands,
operators `{cfg['ops']}`, at most {cfg['max_mul']} `*` per expression, seed {seed}. Generated by:

```
{cmd}
```
"""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command-line flags of `python -m posttrain.tasks.arithmetic`."""
    p = parser or argparse.ArgumentParser(prog="python -m posttrain.tasks.arithmetic",
                                          description="Write the arithmetic quickstart dataset.")
    p.add_argument("--out", required=True, help="output directory, e.g. data/quickstart")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-operand", type=int, default=None, help=f"largest operand (default {MAX_OPERAND})")
    p.add_argument("--min-operands", type=int, default=None, help=f"default {MIN_OPERANDS}")
    p.add_argument("--max-operands", type=int, default=None, help=f"default {MAX_OPERANDS}")
    p.add_argument("--ops", default=None, help=f"operators to use (default {OPS!r})")
    p.add_argument("--max-mul", type=int, default=None, help=f"most `*` per expression (default {MAX_MUL})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the splits and print where they went."""
    ns = build_parser().parse_args(argv)
    keys = ("max_operand", "min_operands", "max_operands", "ops", "max_mul")
    kwargs = {k: getattr(ns, k) for k in keys if getattr(ns, k) is not None}
    try:
        paths = make_splits(ns.out, ns.n_train, ns.n_test, ns.seed, **kwargs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
