"""The SFT stage end to end on a tiny model: run directory, metrics, HF checkpoints, packing, LoRA."""

import json

import pytest
import torch
import yaml

from helpers import recipe_dict, write_addition_data, write_recipe
from posttrain import pipeline
from posttrain.recipe import load_recipe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_addition_data(tmp_path_factory.mktemp("data"))


def _run(tmp_path, data_dir, edit=None, **args):
    recipe = recipe_dict(data_dir, **args)
    if edit:
        edit(recipe)
    path = write_recipe(tmp_path, recipe)
    run_dir = tmp_path / "run"
    pipeline.run(load_recipe(path), run_dir=run_dir)
    return run_dir


def test_sft_run_dir_metrics_and_hf_checkpoint(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def edit(r):
        r["stages"]["sft"]["data"]["validation_size"] = 16

    run_dir = _run(tmp_path, data_dir, edit, steps=4, save_every=2, eval_every=2)
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["stages"]["sft"]["args"]["steps"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("stage", "loss", "lr", "grad_norm", "tokens", "time/step", "time/update"):
        assert key in records[0]
    assert "eval/loss" in records[1] and "eval/loss" in records[3]
    assert (run_dir / "sft" / "checkpoint-2" / "learner").is_dir()
    final = run_dir / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size >= len(tok) and (final / "model.safetensors").is_file()
    assert not list((run_dir / "sft").glob(".tmp-*"))


def test_refuses_to_overwrite_a_run(tmp_path, data_dir):
    from posttrain.errors import UserError

    run_dir = _run(tmp_path, data_dir, steps=1)
    with pytest.raises(UserError, match="--resume"):
        pipeline.run(load_recipe(tmp_path / "t.yaml"), run_dir=run_dir)


def test_loss_goes_down(tmp_path, data_dir):
    run_dir = _run(tmp_path, data_dir, steps=30)
    losses = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_packing_gives_the_same_loss_as_padding(tiny_lm_dir):
    """Packed examples are isolated by position_ids → the same per-token NLL as padded rows."""
    from transformers import AutoModelForCausalLM

    from posttrain.algorithms import sft
    from posttrain.data import collate, pack
    from posttrain.stages.sft import sft_loss

    g = torch.Generator().manual_seed(0)
    examples = []
    for length in (5, 9, 3, 7):
        examples.append({"input_ids": torch.randint(1, 64, (length,), generator=g).tolist(), "mask": [0, 0] + [1] * (length - 2)})
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    args = sft.Args()

    def total(batch):
        out = sft_loss(model, batch, args)
        return (out.loss * out.mask).sum().item(), out.mask.sum().item()

    padded = total(collate(examples, 0))
    packed_rows = pack(examples, max_length=16)
    assert len(packed_rows) == 2
    packed = total(collate(packed_rows, 0))
    assert packed[1] == padded[1]
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)


def test_lora_stage_exports_merged_model(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    def edit(r):
        r["model"]["lora"] = {"r": 4, "alpha": 8}

    run_dir = _run(tmp_path, data_dir, edit, steps=3)
    final = run_dir / "sft" / "final"
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    init = AutoModelForCausalLM.from_pretrained(run_dir / "init-model")
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, init.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only LoRA-targeted linears moved


def test_tensorboard_tracker_and_bf16_autocast(tmp_path, data_dir):
    def edit(r):
        r["tracking"]["trackers"] = ["tensorboard"]
        r["precision"] = "bf16"

    run_dir = _run(tmp_path, data_dir, edit, steps=2)
    assert list(run_dir.rglob("events.out.tfevents*"))
    losses = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(l == l and l < 100 for l in losses)


def test_cli_train_with_override_and_eval_table(tmp_path, data_dir):
    import subprocess
    import sys

    recipe = recipe_dict(data_dir, steps=2)
    recipe["eval"] = {"benchmarks": [{"spec": {  # an inline spec: the held-out split of the training data
        "name": "heldout", "data": {"path": f"{data_dir}/test.jsonl"}, "verifier": {"name": "exact"},
        "prompt": {"column": "prompt", "template": "{prompt}", "chat": False}, "sampling": {"max_tokens": 4}},
        "limit": 8}], "every": 1}
    path = write_recipe(tmp_path, recipe)
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path), "--run-dir", str(tmp_path / "r"),
                           "stages.sft.args.lr=1e-3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initial" in proc.stdout and "sft" in proc.stdout and "heldout pass@1" in proc.stdout
    evals = [json.loads(l) for l in (tmp_path / "r" / "eval.jsonl").read_text().splitlines()]
    assert [e["model"] for e in evals] == ["initial", "sft"] and all(e["n"] == 8 for e in evals)
    assert all(e["accuracy"] == e["metrics"]["heldout"]["pass@1"] for e in evals)
    # every: 1 → also after step 1 of 2 (step 2 is the stage-end evaluation), all in metrics.jsonl
    records = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/heldout/pass@1" in r] == [0, 1, 2]
    assert (tmp_path / "r" / "eval" / "sft-step1.jsonl").is_file()
    assert yaml.safe_load((tmp_path / "r" / "recipe.resolved.yaml").read_text())["stages"]["sft"]["args"]["lr"] == 1e-3
