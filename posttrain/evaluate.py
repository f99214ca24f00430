"""Held-out greedy exact-match accuracy of a checkpoint directory (the recipe's `eval:` block).

Runs on the main process from the saved HF checkpoint, so it measures exactly what a user loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.data import load_rows, render_prompt


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())



def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding, batched with left padding; the text up to the first EOS of each prompt."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def exact_match(model_dir: Path, spec, out_file: Path | None = None) -> dict:
    """Accuracy of greedy answers on `spec.data` (EvalSpec); per-row results go to `out_file` (jsonl)."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()
    rows = load_rows(spec.data, split=spec.split, limit=spec.limit)
    prompts = [render_prompt(tokenizer, r[spec.prompt_column], spec.template, spec.system_prompt) for r in rows]
    completions = greedy_completions(model, tokenizer, prompts, spec.max_new_tokens, spec.batch_size)
    correct = [
        normalize_answer(c) == normalize_answer(str(r[spec.answer_column])) for c, r in zip(completions, rows)
    ]
    if out_file is not None:
        with open(out_file, "w") as f:
            for r, c, ok in zip(rows, completions, correct):
                f.write(json.dumps({"prompt": r[spec.prompt_column], "answer": r[spec.answer_column],
                                    "completion": c, "correct": ok}) + "\n")
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct)}
