"""The learner's one global reduction: the same batch gives the same gradient however it is split."""

import pytest
import torch

from posttrain.algorithms import sft
from posttrain.learner import Learner, lr_at
from posttrain.recipe.schema import ModelSpec, TrainArgs
from posttrain.stages.sft import sft_loss


def _accelerator():
    from posttrain.learner import new_accelerator

    return new_accelerator("fp32")


def _batch(n=8, seed=0):
    """Rows of different lengths and loss-token counts, so a per-micro-batch mean would be wrong."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + 3 * i % 11
        ids = torch.randint(1, 64, (length,), generator=g)
        mask = torch.zeros(length, dtype=torch.long)
        mask[length // 3 :] = 1
        rows.append({"input_ids": ids.tolist(), "mask": mask.tolist()})
    return rows


def _grads_after_step(model_dir, rows, micro, reduction_name):
    from posttrain.data import collate

    train = TrainArgs(lr=1e-3, batch_size=len(rows), micro_batch_size=micro, max_grad_norm=None)
    learner = Learner(_accelerator(), ModelSpec(path=str(model_dir)), train, total_steps=1, init_path=model_dir)
    captured = {}
    inner_step = learner.optimizer.step

    def capture_then_step(*a, **k):
        captured.update({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
        return inner_step(*a, **k)

    learner.optimizer.step = capture_then_step
    args = sft.Args(loss_reduction=reduction_name)
    micro_batches = [collate(rows[i : i + micro], pad_id=0) for i in range(0, len(rows), micro)]
    metrics = learner.train_step(micro_batches, lambda m, mb: sft_loss(m, mb, args), sft.reduction(args))
    return metrics, captured


@pytest.mark.parametrize("reduction_name", ["token-mean", "seq-mean"])
def test_same_gradient_for_1x8_2x4_8x1(tiny_lm_dir, reduction_name):
    rows = _batch()
    results = {micro: _grads_after_step(tiny_lm_dir, rows, micro, reduction_name) for micro in (8, 4, 1)}
    loss8, grads8 = results[8]
    for micro in (4, 1):
        loss, grads = results[micro]
        assert loss["loss"] == pytest.approx(loss8["loss"], rel=1e-5)
        assert loss["tokens"] == loss8["tokens"]
        for name, g in grads8.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def test_naive_per_microbatch_mean_would_differ(tiny_lm_dir):
    """Sanity check that the batch above has teeth: averaging micro-batch token-means is not the token-mean."""
    from posttrain.data import collate

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    rows, args = _batch(), sft.Args()
    whole = collate(rows, 0)
    out = sft_loss(model, whole, args)
    token_mean = (out.loss * out.mask).sum() / out.mask.sum()
    naive = []
    for i in range(0, 8, 4):
        o = sft_loss(model, collate(rows[i : i + 4], 0), args)
        naive.append((o.loss * o.mask).sum() / o.mask.sum())
    assert abs(float(sum(naive) / 2 - token_mean)) > 1e-3


def test_lr_schedule_warmup_then_cosine_to_floor():
    t = TrainArgs(lr=1.0, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, t, total_steps=12) for s in range(12)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    lin = TrainArgs(lr=2.0, lr_schedule="linear")
    assert [lr_at(s, lin, 3) for s in range(3)] == [2.0, 1.0, 0.0]
    assert lr_at(5, TrainArgs(lr=0.3, lr_schedule="constant"), 10) == 0.3
