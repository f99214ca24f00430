"""The RL stage (GRPO / Dr.GRPO / DAPO): batch building, loss invariance, recipe smoke runs, dynamic sampling."""

import json
from pathlib import Path

import pytest
import torch

from helpers import grpo_rows, recipe_dict, write_addition_data, write_recipe
from posttrain import pipeline
from posttrain.algorithms import grpo
from posttrain.recipe import load_recipe
from posttrain.rollout.base import Completion
from posttrain.stages.rl import Group, PromptSet, build_rows, collate_rl, grpo_loss

REPO = Path(__file__).resolve().parents[1]


def test_rows_mask_the_completion_and_align_sampler_logprobs():
    prompts = PromptSet(ids=[[5, 6, 7]], texts=["x"], columns={})
    done = Completion(prompt_index=0, token_ids=[8, 2], text="8", logprobs=[-0.5, -0.25], finish_reason="stop")
    cut = Completion(prompt_index=0, token_ids=[9, 9, 9], text="999", logprobs=[-1.0, -2.0, -3.0], finish_reason="length")
    groups = [Group(prompt=0, completions=[done, cut], rewards=[1.0, 0.0], per_reward={})]
    rows = build_rows(groups, [True], prompts, {"adv": torch.tensor([0.7, -0.7])})
    batch = collate_rl(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 0], [5, 6, 7, 9, 9, 9]]
    # targets are input_ids[:, 1:] = [6, 7, 8, 2, 0] / [6, 7, 9, 9, 9]: the completion (incl. EOS) is masked in
    assert batch["mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["rollout_logp"].tolist() == [[0, 0, -0.5, -0.25, 0], [0, 0, -1.0, -2.0, -3.0]]
    assert batch["adv"].tolist() == pytest.approx([0.7, -0.7]) and batch["truncated"].tolist() == [False, True]
    masked_out = collate_rl(build_rows(groups, [False], prompts, {"adv": torch.zeros(2)}), pad_id=0)
    assert masked_out["mask"].sum() == 0  # groups kept only to fill the batch carry no loss token


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_is_micro_batch_invariant(tiny_lm_dir, aggregation):
    from posttrain.learner import Learner, new_accelerator
    from posttrain.recipe.schema import ModelSpec, TrainArgs

    args = grpo.Args(loss_aggregation=aggregation)
    rows = grpo_rows()
    results = {}
    for micro in (8, 2, 1):
        learner = Learner(new_accelerator(), ModelSpec(path=str(tiny_lm_dir)),
                          TrainArgs(lr=1e-3, batch_size=8, micro_batch_size=micro, max_grad_norm=None), 1, tiny_lm_dir)
        grads = {}
        step = learner.optimizer.step

        def capture(*a, **k):
            grads.update({n: p.grad.clone() for n, p in learner.model.named_parameters()})
            return step(*a, **k)

        learner.optimizer.step = capture
        micro_batches = [collate_rl(rows[i : i + micro], 0) for i in range(0, 8, micro)]
        metrics = learner.train_step(micro_batches, lambda m, mb: grpo_loss(m, mb, args, 1.0), grpo.reduction(args, 16))
        results[micro] = (metrics, grads)
    (m8, g8) = results[8]
    for micro in (2, 1):
        m, g = results[micro]
        assert m["loss"] == pytest.approx(m8["loss"], rel=1e-5, abs=1e-7)
        assert m["clip_frac"] == pytest.approx(m8["clip_frac"], abs=1e-7)
        for name in g8:
            torch.testing.assert_close(g[name], g8[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_addition_data(tmp_path_factory.mktemp("rl-data"))


def _tiny_overrides(data, **args) -> list[str]:
    """Point a shipped recipe at a tiny local model and data, 2 steps, small batches."""
    out = [
        "model.path=null", "model.attn_implementation=null", "model.gradient_checkpointing=false",
        f"model.new={{hidden: 32, layers: 2, heads: 4, kv_heads: 2, max_position: 64, vocab_size: 300, tokenizer_corpus: [{data}/corpus.txt]}}",
        "precision=fp32", "tracking.trackers=[]", "tracking.progress=false",
        f"stages.grpo.data.path={data}/train.jsonl", "stages.grpo.data.prompt_column=prompt",
        "stages.grpo.data.rename={}", "stages.grpo.data.template=plain", "stages.grpo.data.system_prompt=null",
        "stages.grpo.args.steps=2", "stages.grpo.args.prompts_per_step=4", "stages.grpo.args.group_size=4",
        "stages.grpo.args.batch_size=8", "stages.grpo.args.micro_batch_size=4", "stages.grpo.args.max_tokens=6",
        "stages.grpo.args.save_every=0",
    ]
    return out + [f"stages.grpo.args.{k}={v}" for k, v in args.items()]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_shipped_grpo_recipes_run_two_steps_on_a_tiny_model(tmp_path, data_dir, name):
    extra = {"max_sampling_rounds": 2} if name == "dapo" else {}
    overrides = _tiny_overrides(data_dir, **extra)
    if name == "dapo":  # the overlong window must fit the tiny budget
        overrides.append("stages.grpo.rewards=[{name: math}, {name: length, kwargs: {max_tokens: 6, cache: 2}}]")
    resolved = load_recipe(REPO / "recipes" / "grpo" / f"{name}.yaml", overrides)
    run_dir = tmp_path / name
    pipeline.run(resolved, run_dir=run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "reward/math/mean", "accuracy", "clip_frac", "entropy", "completion_len/mean",
                "completion_len/max", "truncation_rate", "zero_variance_groups", "time/generate", "time/score",
                "time/update", "time/sync", "tokens/s", "verifier/math/failures", "verifier/math/timeouts"):
        assert key in records[-1], key
    if name == "grpo":
        assert "kl" in records[-1]  # β = 0.04 loads the frozen reference
    if name == "dapo":
        assert "dynamic/kept_ratio" in records[-1] and "reward/length/mean" in records[-1]
    assert (run_dir / "grpo" / "final" / "model.safetensors").is_file()


def test_grpo_with_lora_and_several_updates_per_step(tmp_path, data_dir):
    r = recipe_dict(data_dir, steps=1)
    r["model"]["lora"] = {"r": 4, "alpha": 8}
    r["stages"]["grpo"] = {
        "data": {"path": f"{data_dir}/train.jsonl", "template": "plain", "max_length": 16},
        "rewards": [{"name": "exact"}],
        "args": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "batch_size": 8, "micro_batch_size": 4,
                 "max_tokens": 5, "ppo_epochs": 2, "tis_cap": 2.0, "lr": 1e-3},
    }
    run_dir = tmp_path / "run"
    pipeline.run(load_recipe(write_recipe(tmp_path, r)), run_dir=run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"grpo"' in l]
    assert [r["step"] for r in records] == [1, 2]
    assert "tis_weight" in records[-1] and 0 < records[-1]["ratio"] < 10


def _nft_recipe(data_dir, rewards):
    r = recipe_dict(data_dir, steps=4)
    r["stages"]["nft"] = {
        "data": {"path": f"{data_dir}/train.jsonl", "template": "plain", "max_length": 16},
        "rewards": rewards,
        "args": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "batch_size": 8, "micro_batch_size": 4,
                 "max_tokens": 6, "dynamic_sampling": True, "max_sampling_rounds": 2, "lr": 1e-3},
    }
    return r


def test_nft_stage_runs_on_the_shared_rl_loop(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    pipeline.run(load_recipe(write_recipe(tmp_path, _nft_recipe(data_dir, [{"name": "exact"}]))), run_dir=run_dir)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["stage"] == "nft" and last["step"] == 2
    for key in ("pos_tokens", "neg_tokens", "clamp_hits", "rate", "dynamic/kept_ratio", "accuracy"):
        assert key in last, key


def test_nft_refuses_a_reward_that_is_not_binary(tmp_path, data_dir):
    from posttrain.errors import UserError

    rewards = [{"name": "length", "kwargs": {"max_tokens": 6, "cache": 5}}]  # fractional penalties
    recipe = _nft_recipe(data_dir, rewards)
    recipe["stages"]["nft"]["args"]["dynamic_sampling"] = False
    with pytest.raises(UserError, match="stages.nft: .*0 or 1"):
        pipeline.run(load_recipe(write_recipe(tmp_path, recipe)), run_dir=tmp_path / "run")
