"""Datasets for every stage: load through `datasets`, render prompts, tokenize, pack and collate.

Loss masks are built on tokens, never by re-tokenizing a decoded string: each segment (prompt, assistant
turn) is tokenized on its own and concatenated, so the mask marks exactly the completion tokens.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from posttrain.annotations import grounding_rows, read_jsonl
from posttrain.errors import UserError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def scan_json_lines(path: str | Path, max_lines: int | None = None) -> tuple[list[dict], list[tuple[int, str]]]:
    """The rows of a JSON-lines file and its bad lines as (1-based line, what is wrong): not UTF-8, not JSON,
    not a JSON object. Blank lines are ignored. `max_lines`: read only that many lines (a quick check)."""
    rows, bad = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if max_lines is not None and number > max_lines:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append((number, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append((number, f"not valid JSON ({err.msg}, column {err.colno})"))
                continue
            if not isinstance(row, dict):
                bad.append((number, f"not a JSON object (got {type(row).__name__})"))
                continue
            rows.append(row)
    return rows, bad


def _is_json_lines(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return True
    with open(path, "rb") as f:  # a .json file holds either JSON lines or one array/object
        head = f.read(4096).lstrip()
    return not head.startswith(b"[")


def _bad_rows_error(where: str, bad: list[tuple[int, str]], noun: str = "line") -> UserError:
    number, why = bad[0]
    more = f" ({len(bad)} bad {noun}s in all)" if len(bad) > 1 else ""
    at = f"{where} row {number}" if noun == "row" else f"{where}:{number}"
    return UserError(f"{at}: {why}{more}; fix the {noun}, or set `data.bad_rows: skip` to leave such "
                     f"rows out and count them")


def _warn_skipped(where: str, bad: list[tuple[int, str]], noun: str = "line") -> None:
    first = ", ".join(f"{n} ({why})" for n, why in bad[:3])
    warnings.warn(f"{where}: skipped {len(bad)} bad {noun}(s) (`data.bad_rows: skip`), first: {first}", stacklevel=3)


def load_rows(path: str, split: str = "train", name: str | None = None, limit: int | None = None,
              rename: dict[str, str] | None = None, bad_rows: str = "error"):
    """A `datasets.Dataset` from a local file (json/jsonl/parquet/csv), a local directory, or a hub id;
    `rename` maps old column names to new ones. A local JSON-lines file is scanned first: a line that is not
    UTF-8, not JSON or not an object is an error naming file:line (`bad_rows="error"`) or is left out and
    counted (`"skip"`; the Dataset then carries `skipped_rows`)."""
    import datasets

    local = Path(path)
    skipped = 0
    try:
        if local.suffix in LOCAL_FORMATS:
            if not local.is_file():
                raise UserError(f"data file `{path}` not found (relative paths are read from {Path.cwd()})")
            good, bad = scan_json_lines(local) if local.suffix in (".json", ".jsonl") and _is_json_lines(local) \
                else (None, [])
            if bad and bad_rows == "error":
                raise _bad_rows_error(str(local), bad)
            if bad:
                _warn_skipped(str(local), bad)
                skipped = len(bad)
                if not good:
                    raise UserError(f"data file `{path}`: no usable line ({len(bad)} bad)")
                ds = datasets.Dataset.from_list(good)
            else:
                ds = datasets.load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        elif local.is_dir() and (local / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(local))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(path, name, split=split)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the path and the reason
        raise UserError(f"cannot load dataset `{path}` (split `{split}`): {err}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if rename:
        missing = sorted(set(rename) - set(ds.column_names))
        if missing:
            raise UserError(f"dataset `{path}`: cannot rename missing column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(ds.column_names)})")
        ds = ds.rename_columns(dict(rename))
    ds.skipped_rows = skipped
    return ds


def load_data(spec, split: str | None = None):
    """The rows of a `DataSpec`: any `load_rows` source, or a grounding annotation file (`format`: charades,
    activitynet, qvhighlights; rows get `video`, `query`, `span`, `duration`), renamed, then once per
    `prompt_template`. A template fills the prompt column from the row's columns; with `video:` it is kept in
    a `_template` column and filled when the video is read (Charades-STA rows get their duration from it)."""
    import datasets

    skipped = 0
    if spec.format == "auto":
        ds = load_rows(spec.path, split or spec.split, spec.name, spec.limit, spec.rename, spec.bad_rows)
        skipped = ds.skipped_rows
    else:
        ds = datasets.Dataset.from_list(load_benchmark_rows(spec.path, spec.format, limit=spec.limit))
        if spec.rename:
            ds = ds.rename_columns(dict(spec.rename))
    templates = [spec.prompt_template] if isinstance(spec.prompt_template, str) else spec.prompt_template
    if not templates:
        ds.skipped_rows = skipped
        return ds
    copies = [ds.add_column("_template", [t] * len(ds)) for t in templates]
    ds = datasets.concatenate_datasets(copies) if len(copies) > 1 else copies[0]
    if spec.video is None:
        ds = ds.map(lambda row: {spec.prompt_column: prompt_text(row, spec)}).remove_columns("_template")
    ds.skipped_rows = skipped  # lines of the file left out by `bad_rows: skip` (plain attribute, read once)
    return ds


def text_problem(column: str, value) -> str | None:
    """What makes `value`, the row's `column`, unusable as text (null, not a string), or None."""
    if value is None:
        return f"`{column}` is missing or null"
    if not isinstance(value, str):
        return f"`{column}` is not text (got {type(value).__name__} {value!r:.40})"
    return None


def _column_names(rows) -> list[str]:
    """A `datasets.Dataset`'s columns, or the keys of a list of dict rows."""
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return list(dict.fromkeys(k for r in rows for k in r))


def row_problem(row: dict, columns) -> str | None:
    """The first of `columns` that is not usable text in `row` (see `text_problem`), or None."""
    return next((p for c in columns if (p := text_problem(c, row.get(c))) is not None), None)


def usable_rows(rows, columns: list[str], spec) -> list[int]:
    """Indices of the rows whose `columns` are all text. A bad row stops with the file and row number
    (`bad_rows: error`) or is left out with one warning and the count in `skipped` (`bad_rows: skip`)."""
    present = set(_column_names(rows))
    # column access: fast on a `datasets.Dataset`; a plain list of dicts works too
    values = {c: (rows[c] if hasattr(rows, "column_names") else [r.get(c) for r in rows]) for c in columns if c in present}
    keep, bad = [], []
    for i in range(len(rows)):
        why = row_problem({c: v[i] for c, v in values.items()}, columns)
        if why is None:
            keep.append(i)
        else:
            bad.append((i + 1, why))
    where = f"dataset `{spec.path}`"
    if bad and spec.bad_rows == "error":
        raise _bad_rows_error(where, bad, "row")
    if bad:
        _warn_skipped(where, bad, "row")
    if not keep:
        raise UserError(f"dataset `{spec.path}`: no usable row (every one has a bad {' or '.join(columns)})")
    return keep


def load_benchmark_rows(path: str, fmt: str = "auto", split: str = "test", name: str | None = None,
                        limit: int | None = None) -> list[dict]:
    """Benchmark or annotation rows as plain dicts: `auto` reads a local jsonl line by line (benchmark files mix
    types within a column, which Arrow rejects or coerces) and anything else `load_rows` reads; a grounding
    format (`annotations.GROUNDING_FORMATS`) through its annotation reader."""
    if fmt == "auto":
        rows = read_jsonl(path) if path.endswith(".jsonl") and Path(path).is_file() else None
        if rows is None:
            rows = load_rows(path, split=split, name=name).to_list()
    else:
        rows = grounding_rows(path, fmt)
    return rows[:limit] if limit else rows


def prompt_text(row: dict, spec) -> str:
    """A row's prompt: its `_template` (see `load_data`) formatted with its columns, else its prompt column."""
    template = row.get("_template")
    if template is None:
        if spec.prompt_column not in row:
            raise UserError(f"dataset `{spec.path}` has no column `{spec.prompt_column}` and no `prompt_template` "
                            f"(columns: {', '.join(row)})")
        return str(row[spec.prompt_column])
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"data.prompt_template {template!r} cannot be filled from columns {sorted(row)}: "
                        f"{type(err).__name__}: {err}") from None


def check_data_files(resolved, sample: int = 1000) -> None:
    """`posttrain validate`'s data check, in seconds and before any model loads: the first `sample` lines of
    each stage's local JSON-lines data are UTF-8 JSON objects with the columns the stage reads, as text (a
    `bad_rows: skip` stage only needs one usable row), and `validation_size` leaves rows to train on."""
    from posttrain.recipe.kinds import stage_kinds

    problems = []
    for stage in resolved.stages:
        spec, at = stage.spec.data, resolved.locate("stages", stage.name, "data")
        path = Path(spec.path)
        if spec.format != "auto" or path.suffix not in (".json", ".jsonl") or not path.is_file() \
                or not _is_json_lines(path):
            continue
        rows, bad = scan_json_lines(path, sample)
        if bad and spec.bad_rows == "error":
            problems.append(f"{at}: stages.{stage.name}.data: {_bad_rows_error(str(path), bad)}")
            continue
        wanted = [spec.prompt_column] if spec.prompt_template is None else []
        if not stage_kinds()[stage.kind].rl:
            wanted.append(spec.completion_column)
        if any(spec.messages_column in r for r in rows):
            wanted = []
        renamed = [{spec.rename.get(k, k): v for k, v in r.items()} for r in rows]
        bad_rows = [(i + 1, why) for i, r in enumerate(renamed)
                    if (why := row_problem(r, wanted))]
        if bad_rows and (spec.bad_rows == "error" or len(bad_rows) == len(renamed)):
            problems.append(f"{at}: stages.{stage.name}.data: {_bad_rows_error(f'dataset `{path}`', bad_rows, 'row')}")
        size = spec.validation_size
        if isinstance(size, int) and not spec.validation:
            with open(path, "rb") as f:
                n = sum(1 for line in f if line.strip())
            if size >= n:
                problems.append(f"{at}: stages.{stage.name}.data.validation_size: {size} rows held out of the {n} "
                                f"rows of `{path}` would leave none to train on")
    if problems:
        raise UserError("\n".join(problems))


# ------------------------------------------------------------------------------------------ rendering


def prompt_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str, template: str, system_prompt: str | None = None) -> str:
    """The text a model sees before its answer: the chat template's generation prompt, or the raw prompt."""
    if template == "plain":
        return (system_prompt + "\n" if system_prompt else "") + prompt
    return tokenizer.apply_chat_template(
        prompt_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
    )


def _segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_assistant) pieces, using the template's prefix property."""
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
            if not before.startswith(done) or not upto.startswith(before):
                raise UserError(
                    "the tokenizer's chat template does not render conversations prefix by prefix, so the "
                    "assistant tokens cannot be located; use `template: plain` or prompt/completion columns"
                )
            pieces += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
    return [(text, is_assistant) for text, is_assistant in pieces if text]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row_segments(tokenizer, row: dict, spec) -> list[tuple[str, bool]]:
    """The (text, is_completion) pieces of one row of prompt/completion or chat messages."""
    if spec.messages_column in row and row[spec.messages_column] is not None:
        if spec.template == "plain":
            raise UserError(f"column `{spec.messages_column}` holds chat messages: it needs `template: chat`")
        return _segments(tokenizer, list(row[spec.messages_column]))
    for col in (spec.prompt_column, spec.completion_column):
        if col not in row:
            raise UserError(f"dataset `{spec.path}` has no column `{col}` (columns: {', '.join(row)})")
    if spec.template == "chat":
        messages = prompt_messages(row[spec.prompt_column], spec.system_prompt)
        messages.append({"role": "assistant", "content": row[spec.completion_column]})
        return _segments(tokenizer, messages)
    prompt = render_prompt(tokenizer, row[spec.prompt_column], "plain", spec.system_prompt)
    return [(prompt, False), (row[spec.completion_column] + tokenizer.eos_token, True)]


def _assemble(tokenizer, segments: list[tuple[str, bool]], pieces: list[list[int]], spec) -> dict:
    ids, mask = [], []
    if tokenizer.bos_token_id is not None and spec.template == "plain":
        ids, mask = [tokenizer.bos_token_id], [0]
    for (_, is_completion), piece in zip(segments, pieces):
        ids += piece
        mask += [int(is_completion)] * len(piece)
    return {"input_ids": ids, "mask": mask}


def tokenize_example(tokenizer, row: dict, spec) -> dict:
    """`input_ids` and `mask` (1 on completion tokens) for one row of prompt/completion or messages."""
    segments = row_segments(tokenizer, row, spec)
    return _assemble(tokenizer, segments, [_ids(tokenizer, text) for text, _ in segments], spec)


@dataclasses.dataclass
class TokenizedSet:
    examples: list[dict]
    dropped: int  # rows with no completion token left after truncation
    skipped: int = 0  # bad rows left out (`bad_rows: skip`): lines of the file, and rows without text


def tokenize_dataset(tokenizer, ds, spec) -> TokenizedSet:
    """Tokenize every row; truncate to `max_length` from the right; drop rows left with no loss token. Rows
    without a usable prompt/completion (or messages) stop the stage or are skipped (`usable_rows`)."""
    skipped = getattr(ds, "skipped_rows", 0)
    names = _column_names(ds)
    if spec.messages_column not in names:
        for col in (spec.prompt_column, spec.completion_column):
            if col not in names:
                raise UserError(f"dataset `{spec.path}` has no column `{col}` (columns: {', '.join(names)})")
        keep = usable_rows(ds, [spec.prompt_column, spec.completion_column], spec)
        skipped += len(ds) - len(keep)
        if len(keep) < len(ds):
            ds = ds.select(keep) if hasattr(ds, "select") else [ds[i] for i in keep]
    per_row = [row_segments(tokenizer, row, spec) for row in ds]
    # One batched call for every segment of every row: the fast tokenizer then works in parallel Rust.
    flat = tokenizer([text for segs in per_row for text, _ in segs], add_special_tokens=False)["input_ids"]
    examples, dropped, k = [], 0, 0
    for segments in per_row:
        ex = _assemble(tokenizer, segments, flat[k : k + len(segments)], spec)
        k += len(segments)
        ex = {key: v[: spec.max_length] for key, v in ex.items()}
        if sum(ex["mask"]) == 0:
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise UserError(f"dataset `{spec.path}`: no row has a completion token within max_length {spec.max_length}")
    if dropped:
        warnings.warn(f"dataset `{spec.path}`: dropped {dropped} rows with no completion token within max_length")
    return TokenizedSet(examples, dropped, skipped)


# ------------------------------------------------------------------------------------ packing, collate


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy sequential packing into rows of at most `max_length` tokens. Each example keeps its own
    `position_ids` (restarting at 0): with no attention mask, transformers builds a block-diagonal causal
    mask from them, so packed examples never attend to each other and the loss equals the unpacked one."""
    rows, current = [], {"input_ids": [], "mask": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "mask": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["mask"] += ex["mask"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch. `mask` is aligned with the targets `input_ids[:, 1:]` (shape [n, L−1])."""
    import torch

    length = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    packed = "position_ids" in examples[0]
    extra = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        mask[i, :n] = torch.tensor(ex["mask"])
        if packed:
            # padding becomes its own segment (positions restart at 0) so it is isolated by the mask
            extra[i, :n] = torch.tensor(ex["position_ids"])
            extra[i, n:] = torch.arange(length - n)
        else:
            extra[i, :n] = 1
    batch = {"input_ids": ids, "mask": mask[:, 1:]}
    batch["position_ids" if packed else "attention_mask"] = extra
    return batch


def stack_padded(tensors, width: int):
    """`[n, width]`: 1-D tensors right-padded with zeros to `width` and stacked (per-token log-probs of rows
    of different lengths, aligned with `collate`'s targets)."""
    import torch

    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0])) for t in tensors])
