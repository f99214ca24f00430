"""Deterministic generator for the quickstart arithmetic task.

Each row is an integer expression over small non-negative operands with `+`, `-` and `*` and the usual
precedence (`*` binds tighter, then left to right), written without spaces and ending in `=`:

    {"prompt": "12+7*3=", "completion": "33", "answer": "33"}

The answer is `str(int)` of the exact value, so it may be negative (`"3-4*5="` -> `"-17"`). The defaults
keep the task small enough for a ~0.5M-parameter transformer trained from scratch with SFT: operands
0..20, 2 or 3 operands, at most one `*` and its two factors 0..MAX_FACTOR.

Command line (writes train.jsonl, test.jsonl, corpus.txt and README.md):

    python -m posttrain.tasks.arithmetic --out data/quickstart [--n-train 20000 --n-test 500 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OPS = "+-*"
# Generation settings of make_rows, with their defaults; each is also a CLI flag (--max-operand ...).
DEFAULTS = {
    "max_operand": 20,  # operands are 0..max_operand
    "max_factor": 9,  # operands next to a `*` are 0..max_factor (keeps products <= 81)
    "min_operands": 2,
    "max_operands": 3,
    "ops": OPS,
    "max_mul": 1,  # at most this many `*` per expression
}
MAX_OPERAND, MAX_FACTOR, MAX_MUL = DEFAULTS["max_operand"], DEFAULTS["max_factor"], DEFAULTS["max_mul"]


def evaluate(prompt: str) -> int:
    """The exact integer value of `prompt` ("12+7*3=" or "12+7*3"), with `*` before `+`/`-`."""
    expr = prompt.removesuffix("=")
    total, sign, term = 0, 1, ""
    for ch in expr + "+":
        if ch in "+-":
            total += sign * _product(term)
            sign, term = (1 if ch == "+" else -1), ""
        else:
            term += ch
    return total


def _product(term: str) -> int:
    """The value of a `*`-separated run of non-negative integers."""
    value = 1
    for factor in term.split("*"):
        if not factor.isdigit():
            raise ValueError(f"not an arithmetic expression term: {term!r}")
        value *= int(factor)
    return value


def _check_settings(cfg: dict) -> None:
    """Raise ValueError for settings that cannot produce an expression."""
    if not 1 <= cfg["min_operands"] <= cfg["max_operands"]:
        raise ValueError(f"need 1 <= min_operands <= max_operands, got {cfg['min_operands']}, {cfg['max_operands']}")
    if not cfg["ops"] or set(cfg["ops"]) - set(OPS):
        raise ValueError(f"ops must be a non-empty subset of {OPS!r}, got {cfg['ops']!r}")
    if cfg["max_operand"] < 0 or cfg["max_factor"] < 0:
        raise ValueError("max_operand and max_factor must be >= 0")
    if set(cfg["ops"]) == {"*"} and cfg["max_mul"] is not None and cfg["max_mul"] < cfg["max_operands"] - 1:
        raise ValueError(f"ops='*' with max_mul={cfg['max_mul']} cannot make {cfg['max_operands']} operands")


def _expression(rng: random.Random, cfg: dict) -> str:
    """One random expression string without the trailing `=`.

    The operand count and operators are drawn first (at most max_mul `*`), then the operands:
    0..max_factor next to a `*`, 0..max_operand elsewhere.
    """
    k = rng.randint(cfg["min_operands"], cfg["max_operands"])
    chosen: list[str] = []
    for _ in range(k - 1):
        full = cfg["max_mul"] is not None and chosen.count("*") >= cfg["max_mul"]
        chosen.append(rng.choice([op for op in cfg["ops"] if not (full and op == "*")]))
    parts = []
    for i in range(k):
        near_mul = (i > 0 and chosen[i - 1] == "*") or (i < k - 1 and chosen[i] == "*")
        parts.append(str(rng.randint(0, cfg["max_factor"] if near_mul else cfg["max_operand"])))
        if i < k - 1:
            parts.append(chosen[i])
    return "".join(parts)


def make_row(expression: str) -> dict:
    """One row {prompt, completion, answer} for an expression without the trailing `=`."""
    answer = str(evaluate(expression))
    return {"prompt": expression + "=", "completion": answer, "answer": answer}


def make_rows(n: int, seed: int = 0, *, unique: bool = True, **settings) -> list[dict]:
    """`n` random rows with columns prompt, completion and answer, deterministic in `seed`.

    `settings` override DEFAULTS (max_operand, max_factor, min_operands, max_operands, ops, max_mul).
    With `unique=True` (the default) no prompt appears twice; a ValueError is raised when the space of
    expressions is too small to give `n` distinct prompts.
    """
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown arithmetic settings: {sorted(unknown)} (valid: {sorted(DEFAULTS)})")
    cfg = {**DEFAULTS, **settings}
    _check_settings(cfg)
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct expressions (got {len(rows)}): widen the ranges")
        expr = _expression(rng, cfg)
        if unique and expr in seen:
            continue
        seen.add(expr)
        rows.append(make_row(expr))
    return rows


def make_splits(out_dir, n_train: int = 20000, n_test: int = 500, seed: int = 0, **settings) -> dict[str, Path]:
    """Write train.jsonl, test.jsonl, corpus.txt and README.md to `out_dir`; return their paths by name.

    All prompts are distinct, so no test prompt is seen in training. `settings` go to `make_rows`.
    """
    rows = make_rows(n_train + n_test, seed, unique=True, **settings)
    random.Random(seed + 1).shuffle(rows)
    test, train = rows[:n_test], rows[n_test:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl",
             "corpus": out / "corpus.txt", "readme": out / "README.md"}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["test"], test)
    paths["corpus"].write_text("".join(r["prompt"] + r["completion"] + "\n" for r in train))
    paths["readme"].write_text(_readme(out, n_train, n_test, seed, settings, train + test))
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """One compact JSON object per line, keys in column order."""
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def _command(out: Path, n_train: int, n_test: int, seed: int, settings: dict) -> str:
    """The command line that regenerates these files."""
    cmd = f"python -m posttrain.tasks.arithmetic --out {out.as_posix()} --n-train {n_train} --n-test {n_test} --seed {seed} --extras"
    for key, value in settings.items():
        cmd += f" --{key.replace('_', '-')} {value}"
    return cmd


def _readme(out: Path, n_train: int, n_test: int, seed: int, settings: dict, rows: list[dict]) -> str:
    """The dataset card written next to the splits."""
    cfg = {**DEFAULTS, **settings}
    values = [int(r["answer"]) for r in rows]
    return f"""# Arithmetic quickstart task

Integer expressions over small non-negative operands with `+`, `-`, `*` and standard precedence
(`*` first, then left to right). The model reads the prompt and must write the exact value.

| column | example | meaning |
|---|---|---|
| `prompt` | `12+7*3=` | the expression, no spaces, ending in `=` |
| `completion` | `33` | the SFT target: `str(int)` of the value, may be negative (`3-4*5=` -> `-17`) |
| `answer` | `33` | same as `completion`; the reference for exact-match rewards and evaluation |

Files:

- `train.jsonl`: {n_train} rows; `test.jsonl`: {n_test} rows. All prompts are distinct, so no test prompt
  appears in training.
- `corpus.txt`: one line per training row, `prompt + completion` (e.g. `12+7*3=33`), for training a tokenizer.
- With `--extras` (made from `train.jsonl`), for the TTCS and distillation quickstarts: `extras/sft.jsonl`, one
  warm start for both (12000 answer rows, 2000 rows with the worked solution before the question,
  `7*3=21,12+21=33;12+7*3=` -> `33`, and 2000 variant-writing rows, `12+7*3=?` -> `<question>4+9*2=</question>`),
  `extras/corpus.txt` (their text) and `extras/distill.jsonl` (4000 other rows: prompt, answer and the privileged
  `solution` column).

Settings (seed {seed}):

- {cfg['min_operands']} to {cfg['max_operands']} operands, each in 0..{cfg['max_operand']}; operators `{cfg['ops']}`
- at most {cfg['max_mul']} `*` per expression, both of its factors in 0..{cfg['max_factor']}
- answers range from {min(values)} to {max(values)}

Generated by:

```
{_command(out, n_train, n_test, seed, settings)}
```
"""


# ------------------------------------------------------------------------ extras: TTCS and distillation


def worked_solution(expression: str) -> str:
    """The steps that compute `expression` (no trailing `=`): products first, then left to right, e.g.
    `12+7*3` → `7*3=21,12+21=33`, `1+2-3` → `1+2=3,3-3=0`. The privileged information of the distill
    quickstart: the teacher's prompt carries it, the student's does not."""
    steps, terms, signs, term = [], [], ["+"], ""
    for ch in expression + "+":
        if ch in "+-":
            if "*" in term:
                steps.append(f"{term}={_product(term)}")
            terms.append(_product(term))
            signs.append(ch)
            term = ""
        else:
            term += ch
    total = terms[0]
    for sign, value in zip(signs[1:], terms[1:]):
        new = total + value if sign == "+" else total - value
        steps.append(f"{total}{sign}{value}={new}")
        total = new
    return ",".join(steps)


def variant(expression: str, rng: random.Random, **settings) -> str:
    """A structurally identical expression (same operators in the same order) with fresh operands drawn as
    `make_rows` draws them, different from `expression` whenever the ranges allow it."""
    cfg = {**DEFAULTS, **settings}
    ops = [ch for ch in expression if ch in OPS]
    for _ in range(20):
        parts = []
        for i in range(len(ops) + 1):
            near_mul = (i > 0 and ops[i - 1] == "*") or (i < len(ops) and ops[i] == "*")
            parts.append(str(rng.randint(0, cfg["max_factor"] if near_mul else cfg["max_operand"])))
            if i < len(ops):
                parts.append(ops[i])
        out = "".join(parts)
        if out != expression:
            return out
    return out


SYNTH_SUFFIX = "?"  # the quickstart synthesizer's prompt: a question followed by `?` (recipes/quickstart/ttcs.yaml)
HINT_SEPARATOR = ";"  # the quickstart teacher's prompt: `<solution>;<question>` (recipes/quickstart/distill.yaml)


def make_extras(out_dir, seed: int = 0, n_answer: int = 12000, n_hinted: int = 2000, n_variant: int = 2000,
                n_distill: int = 4000) -> dict[str, Path]:
    """The files of the TTCS and distillation quickstarts, made from `out_dir/train.jsonl`:

    extras/sft.jsonl      one warm start for both: answer rows, rows with the worked solution before the
                          question (`7*3=21,12+21=33;12+7*3=` → `33`) and variant-writing rows
                          (`12+7*3=?` → `<question>4+9*2=</question>`), shuffled
    extras/corpus.txt     the text of all of them (tokenizer corpus)
    extras/distill.jsonl  prompt, answer and the privileged `solution` column (the distillation stage's prompts)
    """
    out = Path(out_dir)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    rng = random.Random(seed + 17)
    exprs = [r["prompt"].removesuffix("=") for r in train]
    a, b, c = n_answer, n_answer + n_hinted, n_answer + n_hinted + n_variant
    rows = [{"prompt": e + "=", "completion": str(evaluate(e))} for e in exprs[:a]]
    rows += [{"prompt": worked_solution(e) + HINT_SEPARATOR + e + "=", "completion": str(evaluate(e))} for e in exprs[a:b]]
    rows += [{"prompt": e + "=" + SYNTH_SUFFIX, "completion": f"<question>{variant(e, rng)}=</question>"}
             for e in exprs[b:c]]
    rng.shuffle(rows)
    distill = [{"prompt": e + "=", "answer": str(evaluate(e)), "solution": worked_solution(e)}
               for e in exprs[c : c + n_distill]]
    paths = {"extras_sft": out / "extras" / "sft.jsonl", "extras_corpus": out / "extras" / "corpus.txt",
             "extras_distill": out / "extras" / "distill.jsonl"}
    paths["extras_sft"].parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(paths["extras_sft"], rows)
    paths["extras_corpus"].write_text("".join(r["prompt"] + r["completion"] + "\n" for r in rows))
    _write_jsonl(paths["extras_distill"], distill)
    return paths


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command-line flags of `python -m posttrain.tasks.arithmetic`."""
    p = parser or argparse.ArgumentParser(prog="python -m posttrain.tasks.arithmetic",
                                          description="Write the arithmetic quickstart dataset.")
    p.add_argument("--out", required=True, help="output directory, e.g. data/quickstart")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extras", action="store_true",
                   help="also write the TTCS and distillation quickstart files (extras/) from train.jsonl")
    for key, default in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(default), default=None,
                       help=f"default {default}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the splits and print where they went."""
    ns = build_parser().parse_args(argv)
    settings = {k: getattr(ns, k) for k in DEFAULTS if getattr(ns, k) is not None}
    try:
        paths = make_splits(ns.out, ns.n_train, ns.n_test, ns.seed, **settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ns.extras:
        paths.update(make_extras(ns.out, ns.seed))
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
