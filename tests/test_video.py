"""The video path (posttrain/video.py): decoding, frame sampling, preprocessing, the cache, prompts, and the
three traps of Qwen2.5-VL RL loops (M-RoPE temporal positions, sampled pad tokens, renormalised scores)."""

import warnings

import numpy as np
import pytest
import torch

from posttrain import video
from posttrain.algorithms.ops import token_logprobs
from posttrain.rollout.base import MediaPrompt, SamplingParams

pytest.importorskip("av")


def test_frame_indices_follow_fps_and_caps():
    s = video.VideoSettings(fps=2, max_frames=16, min_frames=4)
    assert video.frame_indices(32, 4.0, s, 2) == list(range(0, 32, 2))  # 8 s at 4 fps → 16 frames at 2 fps
    capped = video.VideoSettings(fps=2, max_frames=6)
    assert video.frame_indices(32, 4.0, capped, 2) == [0, 5, 10, 16, 21, 26]  # i·32/6
    dense = video.VideoSettings(fps=0.1, max_frames=32, min_frames=4)
    assert video.frame_indices(10, 1.0, dense, 2) == [0, 2, 5, 7]  # 1 frame wanted → min_frames 4
    with pytest.raises(video.VideoError, match="fewer than one temporal patch"):
        video.frame_indices(1, 1.0, s, 2)


def test_smart_resize_matches_qwen2_vl_rule():
    assert video.smart_resize(32, 32, 28, 784, 3136) == (28, 28)
    assert video.smart_resize(100, 200, 28, 784, 3136) == (28, 56)  # too big: scaled down, aspect kept
    assert video.smart_resize(10, 10, 28, 56 * 56, 10**6) == (56, 56)  # too small: scaled up


def test_patchify_puts_each_merge_window_contiguous_and_flattens_channel_major():
    proc = video.VisionProcessor(patch_size=2, temporal_patch_size=2, merge_size=2)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # [T, C, H, W]
    pixels, grid = proc.patchify(x)
    assert grid == (1, 2, 2) and pixels.shape == (4, 3 * 2 * 2 * 2)
    # row 1 = the patch at (h 0, w 1) of the one 2×2 merge window; flattened as [C, t, p, p]
    expected = x[:, :, 0:2, 2:4].permute(1, 0, 2, 3).reshape(-1)
    assert torch.equal(pixels[1], expected)
    assert torch.equal(pixels[2], x[:, :, 2:4, 0:2].permute(1, 0, 2, 3).reshape(-1))


def test_decoded_synthetic_video_has_the_expected_grid_and_timing(grounding_data):
    proc = video.VisionProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    clip = video.decode(grounding_data / "videos/train_00000.mp4", video.VideoSettings(fps=2, max_frames=16))
    assert clip.frames.shape == (16, 28, 28, 3) and clip.duration == 8.0
    assert clip.timestamps == [k / 2 for k in range(16)]
    media = proc(clip)
    assert media.video_grid_thw.tolist() == [[8, 2, 2]]  # 16 frames / temporal patch 2; 28 px / patch 14
    assert media.n_tokens == 8 and media.pixel_values_videos.shape == (32, 3 * 2 * 14 * 14)
    assert media.second_per_grid_ts.tolist() == [1.0]  # 2 frames per grid step at 2 fps


def test_official_processor_agrees_where_torchvision_is_installed(grounding_data, tiny_vlm_dir):
    official = video.official_processor(tiny_vlm_dir)
    if official is None:
        pytest.skip("torchvision is not installed: transformers' Qwen2-VL video processor cannot run")
    clip = video.decode(grounding_data / "videos/train_00000.mp4", video.VideoSettings(fps=2, max_frames=16))
    ours = video.VisionProcessor.from_pretrained(tiny_vlm_dir)(clip)
    theirs = official(videos=[clip.frames], do_sample_frames=False, return_tensors="pt")
    assert theirs["video_grid_thw"].tolist() == ours.video_grid_thw.tolist()
    assert torch.allclose(theirs["pixel_values_videos"], ours.pixel_values_videos, atol=2e-2)


def test_missing_and_corrupt_videos_are_reported_once_and_remembered(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    cache = video.MediaCache(video.VisionProcessor(), video.VideoSettings(), tmp_path)
    for name, message in (("nowhere", "not found"), ("broken", "cannot decode")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                with pytest.raises(video.VideoError, match=message):
                    cache.get(name)
        assert len(caught) == 1 and name in str(caught[0].message)
    assert set(cache.bad) == {"nowhere", "broken"}


def test_expand_video_tokens_needs_exactly_one_placeholder():
    media = video.Media(None, None, None, n_tokens=3, duration=1.0)
    assert video.expand_video_tokens([1, 9, 2], 9, media) == [1, 9, 9, 9, 2]
    with pytest.raises(video.VideoError, match="exactly one"):
        video.expand_video_tokens([1, 2], 9, media)


# -------------------------------------------------------------------------------------- with the tiny VLM


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir, grounding_data):
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipe.schema import ModelSpec, VideoSpec

    model = load_causal_lm(tiny_vlm_dir, ModelSpec(path=str(tiny_vlm_dir))).eval()
    tokenizer = load_tokenizer(tiny_vlm_dir)
    rows = [{"video": f"videos/train_{k:05d}.mp4", "prompt": "When is the red circle visible?", "duration": None}
            for k in range(3)]
    prompts = video.video_prompts(tokenizer, tiny_vlm_dir, rows, VideoSpec(dir=str(grounding_data), fps=2, max_frames=16),
                                  lambda row: row["prompt"])
    return model, tokenizer, prompts


def test_video_prompt_has_one_pad_per_vision_token_and_reads_the_duration(vlm):
    model, tokenizer, prompts = vlm
    p = prompts.get(0)
    assert isinstance(p, MediaPrompt)
    assert p.token_ids.count(model.config.video_token_id) == p.media.n_tokens == 8
    assert p.token_ids.count(tokenizer.convert_tokens_to_ids(video.VISION_START)) == 1
    assert prompts.get(0).media is p.media  # decoded once, shared by the samples of the prompt


def _full_batch(model, prompt: MediaPrompt, completion: list[int]) -> dict:
    ids = torch.tensor([prompt.token_ids + completion])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **video.batch_media([prompt.media])}


def _rope_positions(model, kwargs: dict):
    """transformers' M-RoPE positions [3, batch, length] for forward inputs built by `video.forward_inputs`."""
    positions, _ = model.model.get_rope_index(
        kwargs["input_ids"], kwargs["mm_token_type_ids"], video_grid_thw=kwargs["video_grid_thw"],
        second_per_grid_ts=kwargs["second_per_grid_ts"], attention_mask=kwargs["attention_mask"])
    return positions


def test_video_tokens_of_different_frames_get_different_temporal_positions(vlm):
    model, _, prompts = vlm
    batch = _full_batch(model, prompts.get(0), [])
    kwargs = video.forward_inputs(model, batch)
    assert kwargs["mm_token_type_ids"].sum() == 2 * 8  # the 8 video tokens are type 2
    positions = _rope_positions(model, kwargs)
    is_video = batch["input_ids"][0] == model.config.video_token_id
    temporal = positions[0, 0, is_video].tolist()
    assert len(set(temporal)) == 8  # one temporal position per grid step (1 s = tokens_per_second 2 apart)
    assert [b - a for a, b in zip(temporal, temporal[1:])] == [2] * 7
    # the trap: without mm_token_type_ids transformers falls back to 1-D positions (no temporal M-RoPE)
    with torch.no_grad():
        with_types = model(**kwargs).logits
        kwargs.pop("mm_token_type_ids")
        without = model(**kwargs).logits
    assert not torch.allclose(with_types, without)


def test_text_after_a_video_continues_from_the_spatial_grid_not_the_last_frame(vlm):
    """Why the vllm engine refuses video (README, TempSamp-R1): transformers numbers the first token after a
    video from the spatial grid (start + max(h, w) / merge), vLLM from the largest position (the last frame's
    temporal one) + 1, so the two would place every answer token differently. If this test fails, transformers
    changed the rule: re-check the vLLM video path."""
    model, tokenizer, prompts = vlm
    p = prompts.get(0)
    batch = _full_batch(model, p, tokenizer("<answer>", add_special_tokens=False)["input_ids"])
    kwargs = video.forward_inputs(model, batch)
    positions = _rope_positions(model, kwargs)
    ids = batch["input_ids"][0].tolist()
    first, last = ids.index(model.config.video_token_id), len(ids) - 1 - ids[::-1].index(model.config.video_token_id)
    start = int(positions[0, 0, first])
    after = positions[:, 0, last + 1].tolist()  # the <|vision_end|> right after the video
    grid_h, grid_w = (int(x) // model.config.vision_config.spatial_merge_size for x in kwargs["video_grid_thw"][0, 1:])
    assert int(positions[0, 0, last]) == start + 14  # 8 temporal steps, 2 apart
    assert after == [start + max(grid_h, grid_w)] * 3  # transformers: after the spatial grid (start + 1 here)
    assert after[0] != int(positions[:, 0, first : last + 1].max()) + 1  # vLLM's rule would give start + 15


def test_pad_tokens_are_never_sampled_and_logprobs_are_the_raw_ones(vlm):
    """Boost `<|video_pad|>` so the raw distribution prefers it: the engine must never sample it, and the
    recorded log-probs must equal teacher forcing on the raw logits (not the renormalised suppressed scores)."""
    from posttrain.rollout.hf import HFEngine

    model, tokenizer, prompts = vlm
    pad = model.config.video_token_id

    def boost(module, args, output):
        output.logits[..., pad] += 8.0
        return output

    handle = model.register_forward_hook(boost)
    try:
        engine = HFEngine(model, tokenizer)
        assert pad in engine.suppressed
        groups = engine.generate([prompts.get(0), prompts.get(1)], SamplingParams(n=4, max_tokens=12, seed=0))
        for group in groups:
            for c in group:
                assert pad not in c.token_ids
        c, prompt = groups[0][0], prompts.get(0)
        with torch.no_grad():
            logits = model(**video.forward_inputs(model, _full_batch(model, prompt, c.token_ids))).logits
        ids = torch.tensor([prompt.token_ids + c.token_ids])
        forced = token_logprobs(logits[:, :-1], ids[:, 1:], 1.0)[0, len(prompt.token_ids) - 1 :]
        assert torch.allclose(forced, torch.tensor(c.logprobs), atol=1e-5)
        renormalised = forced - torch.log1p(-logits[0, len(prompt.token_ids) - 1 : -1].softmax(-1)[:, pad])
        assert not torch.allclose(renormalised, torch.tensor(c.logprobs), atol=1e-3)
    finally:
        handle.remove()


def test_engine_batches_different_videos_like_each_alone(vlm):
    from posttrain.rollout.hf import HFEngine

    model, tokenizer, prompts = vlm
    engine = HFEngine(model, tokenizer)
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=10)
    together = engine.generate([prompts.get(0), prompts.get(2)], greedy)
    alone = [engine.generate([prompts.get(i)], greedy)[0] for i in (0, 2)]
    assert [g[0].token_ids for g in together] == [a[0].token_ids for a in alone]


def test_learner_batches_carry_each_rows_video(vlm):
    """collate_rl concatenates the rows' video tensors in row order; log-probs of a two-row batch equal each row's."""
    from posttrain.stages.rl import collate_rl, sequence_logprobs

    model, tokenizer, prompts = vlm
    rows = []
    for i, completion in ((0, [40, 41, 42]), (2, [43, 44])):
        p = prompts.get(i)
        rows.append({"input_ids": p.token_ids + completion, "mask": [0] * len(p.token_ids) + [1] * len(completion),
                     "credit": {"adv": 1.0}, "truncated": False, "rollout_logp": None, "media": p.media})
    pad = tokenizer.pad_token_id
    batch = collate_rl(rows, pad)
    assert batch["video_grid_thw"].tolist() == [[8, 2, 2], [8, 2, 2]]
    with torch.no_grad():
        both = sequence_logprobs(model, batch, 1.0)
        for k, row in enumerate(rows):
            one = sequence_logprobs(model, collate_rl([row], pad), 1.0)[0]
            n = len(row["input_ids"]) - 1
            assert torch.allclose(both[k, :n], one[:n], atol=1e-5)


def test_freeze_vision_and_language_only_lora(tiny_vlm_dir):
    from posttrain.models import add_lora, load_causal_lm
    from posttrain.recipe.schema import LoraSpec, ModelSpec

    frozen = load_causal_lm(tiny_vlm_dir, ModelSpec(path=str(tiny_vlm_dir), freeze_vision=True))
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".visual." in n or n.startswith("visual"))
    assert any(p.requires_grad for n, p in frozen.named_parameters() if "language_model" in n)
    lora = add_lora(load_causal_lm(tiny_vlm_dir, ModelSpec(path=str(tiny_vlm_dir))), LoraSpec(r=4))
    adapted = [n for n, _ in lora.named_parameters() if "lora_" in n]
    assert adapted and not any("visual" in n for n in adapted)
