"""Benchmark (not a test): one RL loss forward + backward on a micro-batch, padded vs padding-free
(`args.padding_free`: the rows packed with restarting position ids, `learner.packed_inputs`).

A random-init Qwen3-style model, rows of a fixed prompt length and completion lengths drawn uniformly from
[--min-completion, --max-completion] (RL completions vary like this: some stop early, some hit the budget).
Prints the median seconds of each and the share of padding in the padded micro-batch.

    OMP_NUM_THREADS=1 python bench/padding_free.py [--rows 16 --prompt 64 --min-completion 16 --max-completion 384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--min-completion", type=int, default=16)
    parser.add_argument("--max-completion", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, Qwen3Config

    from posttrain.algorithms import grpo
    from posttrain.stages.rl import collate_rl, rl_loss

    config = Qwen3Config(vocab_size=4096, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
                         max_position_embeddings=args.prompt + args.max_completion + 8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(args.rows):
        n = int(torch.randint(args.min_completion, args.max_completion + 1, (1,), generator=g))
        ids = torch.randint(1, 4096, (args.prompt + n,), generator=g).tolist()
        rows.append({"input_ids": ids, "mask": [0] * args.prompt + [1] * n, "credit": {"adv": float(k % 2) - 0.5},
                     "truncated": False, "rollout_logp": None, "media": None})
    mb = collate_rl(rows, pad_id=0)
    real = sum(len(r["input_ids"]) for r in rows)
    padding = 1 - real / mb["input_ids"].numel()

    def once(padding_free: bool) -> float:
        model.zero_grad()
        start = time.perf_counter()
        out = rl_loss(model, mb, grpo, grpo.Args(), 1.0, padding_free=padding_free)
        (out.loss * out.mask).sum().backward()
        return time.perf_counter() - start

    once(False), once(True)  # warm-up
    times = {pf: statistics.median(once(pf) for _ in range(args.repeats)) for pf in (False, True)}
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, {args.rows} rows, prompt {args.prompt}, completions "
          f"{args.min_completion}..{args.max_completion}: {padding:.0%} of the padded micro-batch is padding")
    print(f"padded        {times[False]:.3f} s")
    print(f"padding-free  {times[True]:.3f} s   ({times[False] / times[True]:.2f}x)")


if __name__ == "__main__":
    main()
