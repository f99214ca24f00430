"""The GRPO step's levers (README "GRPO step vs TRL"): one generate call per step by default, a recipe cap on
it, the vLLM hint for larger models, and fused AdamW. Log-probs without full logits: tests/test_logprobs.py;
verifiers in process: tests/test_rewards.py."""

import pytest
import torch

from helpers import recipe_dict, write_addition_data, write_recipe
from posttrain.recipe import load_recipe
from posttrain.stages import rl


class _Ctx:
    def __init__(self, stage, processes=1):
        self.stage = stage
        self.tokenizer = None
        self.accelerator = type("Acc", (), {"num_processes": processes, "is_main_process": True})()


class _Learner:
    def __init__(self, model):
        self.model = model

    def unwrapped(self):
        return self.model


@pytest.fixture(scope="module")
def grpo_stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    data = write_addition_data(root / "data", n_train=20, n_test=2)

    def stage(**args):
        r = recipe_dict(data, steps=1)
        r["stages"]["grpo"] = {"data": {"path": f"{data}/train.jsonl", "template": "plain"},
                               "rewards": [{"name": "exact"}],
                               "args": {"steps": 1, "prompts_per_step": 8, "group_size": 4, "batch_size": 32,
                                        "micro_batch_size": 8, **args}}
        return next(s for s in load_recipe(write_recipe(root, r)).stages if s.name == "grpo")
    return stage


def test_the_hf_engine_generates_a_step_in_one_call_unless_the_recipe_caps_it(grpo_stage):
    model = torch.nn.Linear(2, 2)
    assert rl.engine_options(_Ctx(grpo_stage()), _Learner(model))["batch_size"] == 32  # 8 prompts × 4 samples
    assert rl.engine_options(_Ctx(grpo_stage(), processes=2), _Learner(model))["batch_size"] == 16  # per process
    capped = grpo_stage(generation_batch_size=8)
    assert rl.engine_options(_Ctx(capped), _Learner(model))["batch_size"] == 8


def test_a_larger_text_model_on_the_hf_engine_gets_the_vllm_hint_once(grpo_stage, capsys, monkeypatch):
    monkeypatch.setattr(rl, "_SUGGESTED", set())
    model = torch.nn.Linear(1000, 1000)  # 1M parameters
    rl.engine_options(_Ctx(grpo_stage()), _Learner(model))
    assert capsys.readouterr().out == ""  # below VLLM_FROM_PARAMETERS
    monkeypatch.setattr(rl, "VLLM_FROM_PARAMETERS", 1_000_000)
    rl.engine_options(_Ctx(grpo_stage()), _Learner(model))
    rl.engine_options(_Ctx(grpo_stage()), _Learner(model))
    assert capsys.readouterr().out.count("generates faster with `engine: vllm`") == 1


def test_optimizer_adamw_fused_takes_torchs_fused_kernel_and_updates_like_the_default():
    from posttrain.learner import adamw
    from posttrain.recipe.schema import TrainArgs

    assert TrainArgs().optimizer == "adamw" and TrainArgs(optimizer="adamw_fused").optimizer == "adamw_fused"
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    assert adamw([{"params": params}], fused=True, lr=1e-3).defaults["fused"] is True
    assert not adamw([{"params": params}], lr=1e-3).defaults["fused"]
    reference = [torch.nn.Parameter(params[0].detach().clone())]
    fused, plain = adamw([{"params": params}], fused=True, lr=1e-2), torch.optim.AdamW([{"params": reference}], lr=1e-2)
    for _ in range(3):  # the same update as the default implementation, to float rounding
        for p in (params[0], reference[0]):
            p.grad = torch.ones_like(p) * 0.5
        fused.step()
        plain.step()
    assert torch.allclose(params[0], reference[0], atol=1e-6)
