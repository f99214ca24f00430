"""Tokenization with completion masks: plain, chat prompt/completion, multi-turn messages, truncation."""

import pytest

from posttrain.data import collate, tokenize_dataset, tokenize_example
from posttrain.errors import UserError
from posttrain.recipe.schema import DataSpec


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from posttrain.modeling import build_tokenizer

    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("12+7=19\nhello there, general kenobi\n" * 20)
    return build_tokenizer([corpus], vocab_size=300)


def _masked_text(tok, ex):
    return tok.decode([i for i, m in zip(ex["input_ids"], ex["mask"]) if m])


def test_plain_masks_exactly_the_completion_and_eos(tok):
    ex = tokenize_example(tok, {"prompt": "12+7=", "completion": "19"}, DataSpec(path="x", template="plain"))
    assert tok.decode(ex["input_ids"]) == "12+7=19" + tok.eos_token
    assert _masked_text(tok, ex) == "19" + tok.eos_token
    assert ex["mask"][:5] == [0] * 5  # "1", "2", "+", "7", "="


def test_chat_prompt_completion_masks_the_assistant_turn(tok):
    ex = tokenize_example(tok, {"prompt": "12+7=", "completion": "19"}, DataSpec(path="x", system_prompt="be brief"))
    text = tok.decode(ex["input_ids"])
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n12+7=<|im_end|>\n"
                    "<|im_start|>assistant\n19<|im_end|>\n")
    assert _masked_text(tok, ex) == "19<|im_end|>\n"


def test_messages_mask_every_assistant_turn_only(tok):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "there"},
        {"role": "user", "content": "general"},
        {"role": "assistant", "content": "kenobi"},
    ]
    ex = tokenize_example(tok, {"messages": messages}, DataSpec(path="x"))
    assert _masked_text(tok, ex) == "there<|im_end|>\nkenobi<|im_end|>\n"
    with pytest.raises(UserError, match="needs `template: chat`"):
        tokenize_example(tok, {"messages": messages}, DataSpec(path="x", template="plain"))


def test_missing_column_names_the_columns(tok):
    with pytest.raises(UserError, match=r"no column `completion` \(columns: prompt, answer\)"):
        tokenize_example(tok, {"prompt": "a", "answer": "b"}, DataSpec(path="x"))


def test_truncation_keeps_prefix_and_drops_rows_without_completion(tok):
    rows = [{"prompt": "12+7=", "completion": "19"}, {"prompt": "hello there general kenobi " * 3, "completion": "1"}]
    with pytest.warns(UserWarning, match="dropped 1 rows"):
        out = tokenize_dataset(tok, rows, DataSpec(path="x", template="plain", max_length=8))
    assert out.dropped == 1 and len(out.examples) == 1 and len(out.examples[0]["input_ids"]) == 8


def test_collate_aligns_mask_with_shifted_targets():
    batch = collate([{"input_ids": [5, 6, 7], "mask": [0, 1, 1]}, {"input_ids": [5, 6], "mask": [0, 1]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["mask"].tolist() == [[1, 1], [1, 0]]  # targets are input_ids[:, 1:]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
