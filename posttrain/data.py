"""Datasets for every stage: load through `datasets`, render prompts, tokenize, pack and collate.

Loss masks are built on tokens, never by re-tokenizing a decoded string: each segment (prompt, assistant
turn) is tokenized on its own and concatenated, so the mask marks exactly the completion tokens.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from posttrain.annotations import grounding_rows, read_jsonl
from posttrain.errors import UserError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(path: str, split: str = "train", name: str | None = None, limit: int | None = None,
              rename: dict[str, str] | None = None):
    """A `datasets.Dataset` from a local file (json/jsonl/parquet/csv), a local directory, or a hub id;
    `rename` maps old column names to new ones."""
    import datasets

    local = Path(path)
    try:
        if local.suffix in LOCAL_FORMATS:
            if not local.is_file():
                raise UserError(f"data file `{path}` not found (relative paths are read from {Path.cwd()})")
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
    return ds


def load_data(spec, split: str | None = None):
    """The rows of a `DataSpec`: any `load_rows` source, or a grounding annotation file (`format`: charades,
    activitynet, qvhighlights; rows get `video`, `query`, `span`, `duration`), renamed, then once per
    `prompt_template`. A template fills the prompt column from the row's columns; with `video:` it is kept in
    a `_template` column and filled when the video is read (Charades-STA rows get their duration from it)."""
    import datasets

    if spec.format == "auto":
        ds = load_rows(spec.path, split or spec.split, spec.name, spec.limit, spec.rename)
    else:
        ds = datasets.Dataset.from_list(load_benchmark_rows(spec.path, spec.format, limit=spec.limit))
        if spec.rename:
            ds = ds.rename_columns(dict(spec.rename))
    templates = [spec.prompt_template] if isinstance(spec.prompt_template, str) else spec.prompt_template
    if not templates:
        return ds
    copies = [ds.add_column("_template", [t] * len(ds)) for t in templates]
    ds = datasets.concatenate_datasets(copies) if len(copies) > 1 else copies[0]
    if spec.video is None:
        ds = ds.map(lambda row: {spec.prompt_column: prompt_text(row, spec)}).remove_columns("_template")
    return ds


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


def tokenize_dataset(tokenizer, ds, spec) -> TokenizedSet:
    """Tokenize every row; truncate to `max_length` from the right; drop rows left with no loss token."""
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
    return TokenizedSet(examples, dropped)


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
