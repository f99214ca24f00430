"""One GRPO learner step on a fixed synthetic batch, sharded over however many processes run this script.

Prints a JSON line (main process) with the loss, the gradient norm and a checksum of the updated weights, so
tests can compare `accelerate launch --num_processes 2` with one process accumulating twice as much.
Usage: python grpo_step.py MODEL_DIR AGGREGATION
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import grpo_rows  # noqa: E402

from posttrain.algorithms import grpo
from posttrain.learner import Learner, new_accelerator
from posttrain.recipe.schema import ModelSpec, TrainArgs
from posttrain.stages.context import chunks, shard
from posttrain.stages.rl import collate_rl, grpo_loss


def main(model_dir: str, aggregation: str) -> None:
    acc = new_accelerator()
    args = grpo.Args(loss_aggregation=aggregation, clip_high=0.28)
    train = TrainArgs(lr=1e-2, batch_size=8, micro_batch_size=2, max_grad_norm=None)
    learner = Learner(acc, ModelSpec(path=model_dir), train, 1, model_dir)
    mine = shard(grpo_rows(), acc.process_index, acc.num_processes)
    micro = [collate_rl(c, 0) for c in chunks(mine, train.micro_batch_size)]
    metrics = learner.train_step(micro, lambda m, mb: grpo_loss(m, mb, args, 0.8), grpo.reduction(args, 16))
    checksum = sum(float(p.double().sum()) for p in learner.unwrapped().parameters())
    if acc.is_main_process:
        print(json.dumps({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "checksum": checksum,
                          "processes": acc.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
