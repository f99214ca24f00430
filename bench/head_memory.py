"""Benchmark (not a test): peak memory and time of one GRPO-style loss forward + backward at a 152k vocabulary.

A random-init Qwen3-style model (4 layers, hidden 128, vocabulary 151,936, tied embeddings, fp32), rows of 80
tokens whose last 64 are loss positions. Three ways to get the log-probs, each in a fresh process so that its
peak RSS (`getrusage`) is its own:

* `full`: the whole `[rows, 79, 151936]` fp32 logits (what the learner did before chunking);
* `checkpointed`: the final hidden states of the loss positions through the head in 256 MiB chunks, each under
  activation checkpointing (what a head that is not a plain `nn.Linear`, e.g. a ZeRO-3 partition, still takes);
* `fused`: the same chunks through `ops._FusedHeadLogprobs` (the default for a plain `nn.Linear` head).

    OMP_NUM_THREADS=1 python bench/head_memory.py [--rows 32,128] [--full-up-to 32]

`full` at 128 rows needs more than this 24 GiB box: it runs only up to `--full-up-to` rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from posttrain import learner
from posttrain.algorithms import ops
rows, path = int(sys.argv[1]), sys.argv[2]
if path == "full":
    learner.FULL_LOGITS_BUDGET = 2**62
elif path == "checkpointed":
    ops._fusable = lambda head: False
config = Qwen3Config(vocab_size=151936, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=512, max_position_embeddings=512,
                     tie_word_embeddings=True)
torch.manual_seed(0)
model = Qwen3ForCausalLM(config).float().train()
ids = torch.randint(0, 151936, (rows, 80))
mask = torch.zeros(rows, 79)
mask[:, 15:] = 1  # 64 loss positions per row
mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mask": mask}
began = time.perf_counter()
logp, _ = learner.policy_logprobs(model, mb, 1.0)
(-(logp * mask).sum() / mask.sum()).backward()
print(json.dumps({"seconds": time.perf_counter() - began,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''

PATHS = ("full", "checkpointed", "fused")


def measure(rows: int, path: str) -> dict | None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(rows), path], capture_output=True, text=True)
    if proc.returncode:
        return None  # killed (out of memory) or failed
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,128", help="rows per micro-batch, comma-separated")
    parser.add_argument("--full-up-to", type=int, default=32, help="run the full-logits path only up to these rows")
    ns = parser.parse_args()
    print(f"{'rows':>5}" + "".join(f"{p + ' GiB':>18}{'s':>7}" for p in PATHS))
    for rows in [int(r) for r in ns.rows.split(",")]:
        cells = []
        for path in PATHS:
            skipped = path == "full" and rows > ns.full_up_to
            result = None if skipped else measure(rows, path)
            cells.append(f"{'not run' if skipped else 'failed':>18}{'':>7}" if result is None
                         else f"{result['peak_rss_gib']:>18.2f}{result['seconds']:>7.1f}")
        print(f"{rows:>5}" + "".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
