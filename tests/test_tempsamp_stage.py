"""The TempSamp-R1 stage and the video path end to end on a tiny Qwen2.5-VL: recipe smoke runs, the off-policy
row as the learner sees it, video evaluation from the command line (synthetic videos, and Charades-STA
annotations from ../shared/data joined with a video directory)."""

import json
from pathlib import Path

import pytest
import torch

from helpers import run_two_steps


def run_with_eval(recipe: Path, overrides: list[str], run_dir: Path, stage: str) -> Path:
    """`run_two_steps` for a recipe that keeps its `eval:` (whose rows in metrics.jsonl carry no `loss`)."""
    from posttrain import pipeline
    from posttrain.recipe import load_recipe

    pipeline.run(load_recipe(recipe, overrides), run_dir=run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == stage and "loss" in r] == [1, 2]
    return run_dir

pytest.importorskip("av")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def video_overrides(data: Path) -> list[str]:
    """Point recipes/quickstart/video.yaml at the tiny synthetic data, a tiny VLM and tiny batches."""
    video = f"{{dir: {data}, fps: 2, max_frames: 16}}"
    return [
        f"model.new={{arch: qwen2_5_vl, hidden: 32, layers: 2, heads: 2, kv_heads: 1, max_position: 128, "
        f"vocab_size: 300, tokenizer_corpus: [{data}/corpus.txt]}}",
        "tracking.progress=false",
        f"eval.benchmarks=[{{bench: grounding_quickstart, data: {data}/test.jsonl, limit: 2, spec: {{video: {video}}}}}]",
        "eval.every=0",
        f"stages.sft.data.path={data}/train.jsonl", f"stages.sft.data.video={video}",
        "stages.sft.args.steps=2", "stages.sft.args.batch_size=4", "stages.sft.args.micro_batch_size=4",
        f"stages.tempsamp.data.path={data}/train.jsonl", f"stages.tempsamp.data.video={video}",
        "stages.tempsamp.args.steps=2", "stages.tempsamp.args.prompts_per_step=2", "stages.tempsamp.args.group_size=4",
        "stages.tempsamp.args.micro_batch_size=8", "stages.tempsamp.args.max_tokens=8",
    ]


def test_quickstart_video_recipe_runs_and_the_reference_row_reaches_the_learner(grounding_data, tmp_path, monkeypatch):
    from posttrain.stages import rl

    captured = []
    original = rl.build_rows

    def spy(groups, trains, prompts, credit):
        rows = original(groups, trains, prompts, credit)
        captured.append((groups, rows, prompts))
        return rows

    monkeypatch.setattr(rl, "build_rows", spy)
    run = run_with_eval(REPO / "recipes/quickstart/video.yaml", video_overrides(grounding_data), tmp_path / "run",
                        "tempsamp")

    groups, rows, prompts = captured[0]
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(run / "init-model")
    for g, group in enumerate(groups):
        assert len(group.completions) == 4 and group.n_sampled == 3
        last = rows[4 * g + 3]
        s, e = prompts.columns["span"][group.prompt]
        reference = tok(f"<answer> {s:.2f} to {e:.2f} </answer>", add_special_tokens=False)["input_ids"]
        n = len(reference) + 1
        assert last["input_ids"] == prompts.prompt_ids(group.prompt) + reference + [tok.eos_token_id]
        assert last["rollout_logp"] is None and last["credit"]["offpolicy"] == 1.0
        assert last["mask"][-n:] == [1] * n and sum(last["mask"]) == n  # loss on the reference and its EOS only
        for k in range(3):
            # no tis_cap in the recipe: the engine is not asked for sampler log-probs (they would go unused)
            assert rows[4 * g + k]["credit"]["offpolicy"] == 0.0 and rows[4 * g + k]["rollout_logp"] is None
        assert group.rewards[-1] == pytest.approx(1.1)  # IoU 1 + 0.1 × format
        # the learner's advantages: the soft shaping of the IoU alone, plus 0.1 × format, then the group norm
        from posttrain.algorithms import grpo, tempsamp

        iou, fmt = torch.tensor(group.per_reward["temporal_iou"]), torch.tensor(group.per_reward["format"])
        expected = grpo.group_advantages(tempsamp.soft_reward(iou) + 0.1 * fmt, 4, tempsamp.Args())
        assert [r["credit"]["adv"] for r in rows[4 * g : 4 * g + 4]] == pytest.approx(expected.tolist(), abs=1e-5)
        assert rows[4 * g]["media"] is not None

    evals = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["model"] for e in evals] == ["initial", "sft", "tempsamp"]
    assert set(evals[-1]["metrics"]["grounding_quickstart"]) == {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run / "tempsamp" / "final")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["stage"] == "tempsamp" and r["step"] == 1)
    assert {"reward/temporal_iou/mean", "reward/format/mean", "video/skipped"} <= set(step)


def test_grpo_on_video_data_without_reference_rows(grounding_data, tmp_path):
    """`offpolicy: false, soft_advantage: false` is plain GRPO on the same data (the comparison run)."""
    overrides = video_overrides(grounding_data) + ["stages.tempsamp.args.offpolicy=false",
                                                    "stages.tempsamp.args.soft_advantage=false", "eval=null"]
    run_two_steps(REPO / "recipes/quickstart/video.yaml", overrides, tmp_path / "run", "tempsamp")


def test_video_eval_cli_on_the_synthetic_task(grounding_data, tiny_vlm_dir, tmp_path):
    from posttrain.cli import main

    out = tmp_path / "out"
    assert main(["eval", str(tiny_vlm_dir), "--bench", "grounding_quickstart", "--data", str(grounding_data / "test.jsonl"),
                 "--videos", str(grounding_data), "--limit", "3", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["metrics"]["grounding_quickstart"]) >= {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {"completion", "parsed", "iou", "span", "video", "query"} <= set(samples[0])
    assert doc["info"]["grounding_quickstart"]["skipped_videos"] == 0


@pytest.mark.skipif(not (SHARED / "charades_sta/charades_sta_test.txt").is_file(), reason="needs ../shared/data")
def test_charades_annotations_join_a_video_directory_and_skip_missing_videos(tiny_vlm_dir, tmp_path):
    """The real Charades-STA annotation file, with videos written under the ids of its first rows; a query whose
    video is absent is skipped and counted, never a crash; durations come from the videos."""
    import numpy as np

    from posttrain.cli import main
    from posttrain.annotations import charades_rows
    from posttrain.video import write_video

    rows = charades_rows(str(SHARED / "charades_sta/charades_sta_test.txt"))[:6]
    present = sorted({r["video"] for r in rows})[:-1]  # the last video id is left missing on purpose
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in present:
        write_video(videos / f"{name}.mp4", np.zeros((8, 28, 28, 3), dtype=np.uint8), 2)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping"):
        assert main(["eval", str(tiny_vlm_dir), "--bench", "charades_sta", "--data",
                     str(SHARED / "charades_sta/charades_sta_test.txt"), "--videos", str(videos), "--limit", "6",
                     "--max-tokens", "8", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    info = doc["info"]["charades_sta"]
    expected = sum(r["video"] in present for r in rows)
    assert info["queries"] == expected and info["skipped_videos"] == 6 - expected
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["video"] in present for s in samples)


def test_tempsamp_loss_gives_the_reference_row_gradient_without_sampler_logprobs():
    """Collated as the stage does: the reference row's rollout_logp is 0 and must not enter its ratio."""
    from posttrain.algorithms import tempsamp
    from posttrain.stages.rl import collate_rl

    rows = [{"input_ids": [1, 2, 3, 4], "mask": [0, 1, 1, 1], "credit": {"adv": 0.5, "offpolicy": 0.0},
             "truncated": False, "rollout_logp": [-1.0, -1.0, -1.0]},
            {"input_ids": [1, 2, 5, 6], "mask": [0, 1, 1, 1], "credit": {"adv": 1.5, "offpolicy": 1.0},
             "truncated": False, "rollout_logp": None}]
    batch = collate_rl(rows, 0)
    logp = torch.full((2, 3), -2.0, requires_grad=True)
    out = tempsamp.loss(logp, batch, tempsamp.Args(tis_cap=2.0))
    out.loss.sum().backward()
    assert logp.grad[1].tolist() == pytest.approx([-1.5, -1.5, -1.5])  # −A, ratio 1, TIS weight 1


def test_hybrid_prompt_templates_give_every_row_once_per_template(tmp_path):
    from posttrain.data import load_data
    from posttrain.recipe.schema import DataSpec

    path = tmp_path / "rows.jsonl"
    path.write_text('{"query": "a", "span": [1, 2]}\n{"query": "b", "span": [3, 4]}\n')
    spec = DataSpec(path=str(path), prompt_template=["Think: {query}", "Answer: {query}"])
    rows = load_data(spec)
    assert rows["prompt"] == ["Think: a", "Think: b", "Answer: a", "Answer: b"]
    video = DataSpec(path=str(path), prompt_template=["T {query}", "A {query}"], video={"dir": str(tmp_path)})
    assert load_data(video)["_template"] == ["T {query}", "T {query}", "A {query}", "A {query}"]  # filled per video


def test_video_data_with_the_vllm_engine_is_refused_before_loading(grounding_data, tmp_path):
    from posttrain import pipeline
    from posttrain.errors import UserError
    from posttrain.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/quickstart/video.yaml", video_overrides(grounding_data) + [
        "eval=null", "stages.sft.args.steps=1", "stages.tempsamp.engine=vllm"])
    with pytest.raises(UserError, match="video data runs on `engine: hf`"):
        pipeline.run(recipe, run_dir=tmp_path / "run")


def test_a_stage_whose_videos_all_fail_stops_with_a_clear_error(grounding_data, tmp_path):
    """Every video file exists but none decodes: the stage reports each once and stops with a message."""
    import shutil

    from posttrain import pipeline
    from posttrain.errors import UserError
    from posttrain.recipe import load_recipe

    broken = tmp_path / "broken"
    shutil.copytree(grounding_data, broken)
    for mp4 in (broken / "videos").glob("*.mp4"):
        mp4.write_bytes(b"not a video")
    overrides = video_overrides(broken) + ["eval=null", f"stages.sft.data.path={grounding_data}/train.jsonl",
                                           f"stages.sft.data.video={{dir: {grounding_data}}}"]
    with pytest.warns(UserWarning, match="cannot decode"):
        with pytest.raises(UserError, match="no video of the dataset can be read"):
            pipeline.run(load_recipe(REPO / "recipes/quickstart/video.yaml", overrides), run_dir=tmp_path / "run")


def test_tempsamp_needs_room_for_samples(grounding_data, tmp_path):
    from posttrain import pipeline
    from posttrain.errors import UserError
    from posttrain.recipe import load_recipe

    overrides = video_overrides(grounding_data) + ["eval=null", "stages.tempsamp.args.group_size=1",
                                                    "stages.tempsamp.args.micro_batch_size=2"]
    with pytest.raises(UserError, match="group_size: 1 leaves no room"):
        pipeline.run(load_recipe(REPO / "recipes/quickstart/video.yaml", overrides), run_dir=tmp_path / "run")
