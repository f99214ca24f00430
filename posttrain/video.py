"""Video for vision-language models (Qwen2-VL / Qwen2.5-VL): decode, sample frames, patchify, cache, batch.

    path ──PyAV──▶ frames sampled at `fps` (≤ `max_frames`, a multiple of the temporal patch) ──resize to a
    multiple of patch×merge within [min_pixels, max_pixels], rescale, normalise──▶ `pixel_values_videos`
    [grid_t·grid_h·grid_w, C·temporal_patch·patch²], `video_grid_thw` [1, 3], `second_per_grid_ts` [1]

and the prompt's one `<|video_pad|>` becomes grid_t·grid_h·grid_w / merge² copies (one per vision token).

Why our own preprocessing: transformers' `Qwen2VLVideoProcessor` imports torchvision, which has no CPU build
on our package index. `VisionProcessor` re-implements its arithmetic (Qwen2-VL `smart_resize`, fps-based frame
indices, the patch permutation) with numpy, PIL and torch; `official_processor` uses transformers' own when
torchvision is importable, and tests/test_video.py checks the two agree wherever both run. The one known
difference: frames are resized with PIL's bicubic filter, torchvision's bicubic interpolation differs from it
by rounding (a few 1e-3 after normalisation).

Three traps this module exists to close (each has a test):
* Qwen2.5-VL computes its temporal M-RoPE positions only when `mm_token_type_ids` (and `second_per_grid_ts`)
  reach the forward pass; without them every frame gets the same temporal position. `forward_inputs` always
  adds them.
* A policy can sample `<|video_pad|>` / `<|image_pad|>`; the next forward then has more vision tokens than
  features and fails. `suppressed_token_ids` names them and every rollout backend masks them.
* The log-probs of suppressed sampling come from the raw logits (see `posttrain.rollout.base`), never from
  `generate`'s renormalised `scores`.

Imports of av, numpy, PIL and torch happen inside the functions: `import posttrain.video` is cheap.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END  # what a prompt holds where the video goes
VIDEO_MARKER = "<video>"  # written in a prompt's text where the video goes (default: before the text)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
# OpenAI CLIP statistics: Qwen2-VL's image_mean / image_std
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoError(UserError, ValueError):
    """A video that cannot be found or decoded (the message names its path)."""


MEDIA_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")  # a video's forward inputs (`Media`)

# ----------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """Frame sampling and the pixel budget (the knobs Qwen2.5-VL recipes set).

    fps         frames sampled per second of video
    max_frames  cap on sampled frames (long videos are sampled more sparsely)
    min_frames  floor on sampled frames (short videos are sampled more densely, up to every frame)
    max_pixels  pixels per frame at most (None: the model's processor setting)
    min_pixels  pixels per frame at least (None: the model's processor setting)
    """

    fps: float = 2.0
    max_frames: int = 32
    min_frames: int = 4
    max_pixels: int | None = None
    min_pixels: int | None = None


@dataclasses.dataclass
class Clip:
    frames: Any  # uint8 numpy [T, H, W, 3]
    timestamps: list[float]  # seconds of each sampled frame
    duration: float  # seconds of the whole video


@dataclasses.dataclass
class Media:
    """One processed video: the model inputs and how many `<|video_pad|>` tokens it needs."""

    pixel_values_videos: Any  # float32 [grid_t·grid_h·grid_w, C·temporal_patch·patch²]
    video_grid_thw: Any  # long [1, 3]
    second_per_grid_ts: Any  # float32 [1]: seconds covered by one temporal grid step
    n_tokens: int  # grid_t·grid_h·grid_w / merge²
    duration: float
    frames: Any = None  # the sampled uint8 frames (for backends that process video themselves, e.g. vLLM)
    fps: float = 0.0  # frames per second actually sampled


# --------------------------------------------------------------------------------------------- decoding


def frame_indices(total: int, video_fps: float, settings: VideoSettings, factor: int) -> list[int]:
    """Which of `total` frames to keep: `duration · fps` frames, clamped to [min_frames, max_frames] and to
    `total`, rounded down to a multiple of `factor` (the temporal patch), spread evenly (Qwen2-VL's rule)."""
    cap = math.floor(min(settings.max_frames, total) / factor) * factor
    if cap < factor:
        raise VideoError(f"the video has {total} frames: fewer than one temporal patch of {factor}")
    wanted = total / video_fps * settings.fps
    n = min(max(wanted, settings.min_frames), cap, total)
    n = max(factor, math.floor(n / factor) * factor)
    return [int(i * total / n) for i in range(n)]


def decode(path: str | Path, settings: VideoSettings, factor: int = 2) -> Clip:
    """Decode `path` with PyAV and keep the frames `frame_indices` picks."""
    try:
        import av
    except ImportError as err:
        raise UserError("reading videos needs PyAV: pip install 'posttrain[video]' (or pip install av)") from err
    import numpy as np

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    except (av.FFmpegError, IndexError, OSError) as err:
        raise VideoError(f"cannot decode video `{path}`: {err}") from None
    if not frames:
        raise VideoError(f"video `{path}` has no frames")
    rate = rate or 1.0
    keep = frame_indices(len(frames), rate, settings, factor)
    return Clip(np.stack([frames[i] for i in keep]), [i / rate for i in keep], len(frames) / rate)


def write_video(path: str | Path, frames, fps: float) -> None:
    """Write uint8 RGB frames [T, H, W, 3] (H, W even) as an H.264 mp4 (synthetic test videos)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}  # near-lossless: colours must survive the codec
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def resolve(video_dir: str | Path | None, name: str) -> Path:
    """The file of video `name`: itself if it exists, else `video_dir/name`, trying the usual extensions
    when `name` has none (annotations name Charades / ActivityNet videos by id)."""
    direct = Path(name)
    if direct.is_file():
        return direct
    base = Path(video_dir) / name if video_dir else direct
    if base.is_file():
        return base
    for ext in VIDEO_EXTENSIONS:
        if base.with_name(base.name + ext).is_file():
            return base.with_name(base.name + ext)
    raise VideoError(f"video `{name}` not found" + (f" in `{video_dir}`" if video_dir else "")
                     + f" (tried {', '.join(VIDEO_EXTENSIONS)})")


# ---------------------------------------------------------------------------------------- preprocessing


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclasses.dataclass(frozen=True)
class VisionProcessor:
    """Qwen2-VL video preprocessing without torchvision (see module doc). Settings come from the model
    directory's `video_preprocessor_config.json` or `preprocessor_config.json` (`from_pretrained`)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VisionProcessor":
        config = {}
        files = processor_files(path)
        if not files:
            warnings.warn(f"`{path}` has no {' / '.join(PROCESSOR_FILES)}: using Qwen2-VL's default video "
                          f"preprocessing", stacklevel=2)
        for file in files:  # the video one (listed last) wins
            config.update(json.loads(Path(file).read_text()))
        size = config.get("size") or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}
        kwargs.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        kwargs.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        return cls(**kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        config = {**dataclasses.asdict(self), "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                  "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
        Path(path, "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def __call__(self, clip: Clip, settings: VideoSettings = VideoSettings()) -> Media:
        import numpy as np
        import torch
        from PIL import Image

        frames = clip.frames
        t, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, settings.min_pixels or self.min_pixels,
                            settings.max_pixels or self.max_pixels)
        if (h, w) != (height, width):
            frames = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])
        x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)  # [T, H, W, C]
        mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
        x = ((x - mean) / std).permute(0, 3, 1, 2)  # [T, C, H, W]
        if pad := -t % self.temporal_patch_size:  # repeat the last frame to fill the temporal patch
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        pixels, grid = self.patchify(x)
        fps = len(clip.timestamps) / clip.duration if clip.duration > 0 else 1.0
        return Media(
            pixel_values_videos=pixels,
            video_grid_thw=torch.tensor([grid], dtype=torch.long),
            second_per_grid_ts=torch.tensor([self.temporal_patch_size / fps], dtype=torch.float32),
            n_tokens=grid[0] * grid[1] * grid[2] // self.merge_size**2,
            duration=clip.duration, frames=clip.frames, fps=fps,
        )

    def patchify(self, x):
        """[T, C, H, W] → [grid_t·grid_h·grid_w, C·tp·p·p] in the order Qwen2-VL's vision tower expects:
        merge windows contiguous (each merge² patches adjacent), each patch flattened channel-major."""
        t, c, h, w = x.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = t // tp, h // p, w // p
        patches = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw)


PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


def processor_files(path: str | Path) -> list[Path]:
    """The preprocessing configs of a model: files of a local directory, else downloaded from the hub."""
    local = Path(path)
    if local.is_dir():
        return [local / n for n in PROCESSOR_FILES if (local / n).is_file()]
    out = []
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return out
    for name in PROCESSOR_FILES:
        try:
            out.append(Path(hf_hub_download(str(path), name)))
        except Exception:  # absent file, offline, unknown repo: the caller warns when nothing was found
            continue
    return out


def official_processor(path: str | Path):
    """transformers' `Qwen2VLVideoProcessor` for `path` when torchvision is importable, else None."""
    try:
        import torchvision  # noqa: F401
        from transformers import AutoVideoProcessor
    except ImportError:
        return None
    return AutoVideoProcessor.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------------ cache


class MediaCache:
    """Videos decoded and processed once, kept in an LRU of `capacity` (the G samples of a prompt, its
    learner forwards and later epochs share one `Media`). A video that is missing or cannot be decoded is
    reported once (a warning naming its path), remembered as bad, and raises `VideoError` every time."""

    def __init__(self, processor: VisionProcessor, settings: VideoSettings, video_dir: str | Path | None = None,
                 capacity: int = 256):
        self.processor, self.settings, self.video_dir, self.capacity = processor, settings, video_dir, capacity
        self._items: collections.OrderedDict[str, Media] = collections.OrderedDict()
        self.bad: dict[str, str] = {}  # name → reason

    def get(self, name: str) -> Media:
        if name in self.bad:
            raise VideoError(self.bad[name])
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        try:
            clip = decode(resolve(self.video_dir, name), self.settings, self.processor.temporal_patch_size)
            media = self.processor(clip, self.settings)
        except VideoError as err:
            self.bad[name] = str(err)
            warnings.warn(f"skipping video: {err}", stacklevel=2)
            raise
        self._items[name] = media
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return media


# ----------------------------------------------------------------------------------------- token layout


def expand_video_tokens(ids: list[int], video_token_id: int, media: Media) -> list[int]:
    """`ids` with its one `<|video_pad|>` replaced by `media.n_tokens` copies."""
    at = [i for i, t in enumerate(ids) if t == video_token_id]
    if len(at) != 1:
        raise VideoError(f"a video prompt needs exactly one {VIDEO_PAD} token (found {len(at)}): put "
                         f"`{VIDEO_PLACEHOLDER}` where the video goes")
    k = at[0]
    return ids[:k] + [video_token_id] * media.n_tokens + ids[k + 1 :]


def suppressed_token_ids(tokenizer) -> list[int]:
    """Vision placeholder tokens a policy must never sample (`<|video_pad|>`, `<|image_pad|>`), if the
    tokenizer has them: a sampled one would make the next forward's vision tokens outnumber its features."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in (VIDEO_PAD, IMAGE_PAD) if t in vocab]


def batch_media(media: list[Media | None]) -> dict:
    """The vision inputs of a batch whose rows carry `media` (None: a text-only row), concatenated in row
    order as the model expects; {} when no row has a video."""
    import torch

    present = [m for m in media if m is not None]
    if not present:
        return {}
    return {key: torch.cat([getattr(m, key) for m in present]) for key in MEDIA_KEYS}


def _config(model):
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model.config


def forward_inputs(model, batch: dict) -> dict:
    """Keyword arguments of a forward pass over a collated batch: ids, attention mask or packed position ids,
    and, when the batch carries video, its pixels, grids and `mm_token_type_ids` (0 text, 1 image, 2 video)
    so Qwen2.5-VL builds its 3-D (temporal, height, width) positions."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    if batch.get("pixel_values_videos") is not None:
        kwargs.update({k: batch[k] for k in MEDIA_KEYS})
        kwargs["mm_token_type_ids"] = mm_token_type_ids(batch["input_ids"], _config(model))
    return kwargs


def mm_token_type_ids(input_ids, config):
    """0 for text, 1 for `<|image_pad|>`, 2 for `<|video_pad|>` positions."""
    import torch

    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == getattr(config, "image_token_id", -1)] = 1
    types[input_ids == getattr(config, "video_token_id", -1)] = 2
    return types


# ------------------------------------------------------------------------------------------- datasets


class VideoPrompts:
    """The prompts of a video dataset, built on first use: decode the row's video (through the cache), fill
    its text with `fill(row)` (`duration` read from the video when the annotation has none: Charades-STA),
    put the video placeholder first, render (`template` chat | plain), tokenize, expand the `<|video_pad|>` run.

    `get(i)` raises `VideoError` for a video that is missing or cannot be decoded (reported once by the cache).
    """

    def __init__(self, tokenizer, rows: list[dict], column: str, cache: MediaCache, video_token_id: int, fill,
                 template: str = "plain", system_prompt: str | None = None):
        self.tokenizer, self.rows, self.column, self.cache = tokenizer, rows, column, cache
        self.video_token_id, self.fill, self.template, self.system_prompt = video_token_id, fill, template, system_prompt
        self.missing = 0  # rows dropped up front because their video file does not exist
        self._texts: dict[int, str] = {}
        self._ids: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        return str(self.rows[i][self.column])

    @property
    def distinct_videos(self) -> int:
        return len({self.name(i) for i in range(len(self.rows))})

    def media(self, i: int) -> Media:
        return self.cache.get(self.name(i))

    def text(self, i: int) -> str:
        """The rendered prompt (chat template applied, the video placeholder unexpanded)."""
        if i not in self._texts:
            from posttrain.data import render_prompt

            row = dict(self.rows[i])
            if row.get("duration") is None:
                row["duration"] = round(self.media(i).duration, 2)
            self._texts[i] = render_prompt(self.tokenizer, place_video(self.fill(row)), self.template,
                                           self.system_prompt)
        return self._texts[i]

    def get(self, i: int):
        from posttrain.datatypes import MediaPrompt

        media = self.media(i)
        if i not in self._ids:
            ids = self.tokenizer(self.text(i), add_special_tokens=False)["input_ids"]
            self._ids[i] = expand_video_tokens(ids, self.video_token_id, media)
        return MediaPrompt(self._ids[i], media)


def place_video(text: str) -> str:
    """`text` with the video placeholder where it says `<video>` (once), else in front (Qwen's convention)."""
    if text.count(VIDEO_MARKER) > 1:
        raise VideoError(f"a prompt may say {VIDEO_MARKER} once, got {text!r}")
    return text.replace(VIDEO_MARKER, VIDEO_PLACEHOLDER) if VIDEO_MARKER in text else VIDEO_PLACEHOLDER + text


def video_prompts(tokenizer, model_path, rows: list[dict], video, fill, template: str = "plain",
                  system_prompt: str | None = None, source: str = "dataset") -> VideoPrompts:
    """`VideoPrompts` over `rows` (`video`: a recipe's `VideoSpec`); the rows whose video file is missing are
    dropped first (one warning with the count and the first names), so a run never stops on them."""
    present, missing = [], []
    for row in rows:
        try:
            resolve(video.dir, str(row[video.column]))
            present.append(row)
        except (VideoError, KeyError):
            missing.append(str(row.get(video.column)))
    if rows and video.column not in rows[0]:
        raise UserError(f"{source} has no video column `{video.column}` (columns: {', '.join(rows[0])})")
    if missing:
        warnings.warn(f"{source}: skipping {len(missing)} of {len(rows)} rows whose video is missing "
                      f"(first: {', '.join(missing[:3])}; video dir: {video.dir})", stacklevel=2)
    if not present:
        raise UserError(f"{source}: no video found (video dir `{video.dir}`, column `{video.column}`)")
    settings = VideoSettings(fps=video.fps, max_frames=video.max_frames, min_frames=video.min_frames,
                             max_pixels=video.max_pixels, min_pixels=video.min_pixels)
    cache = MediaCache(VisionProcessor.from_pretrained(model_path), settings, video.dir, video.cache)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    if video_id is None or video_id == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer has no {VIDEO_PAD} token: video data needs a vision-language model")
    prompts = VideoPrompts(tokenizer, present, video.column, cache, video_id, fill, template, system_prompt)
    prompts.missing = len(missing)
    return prompts
