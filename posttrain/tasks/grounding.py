"""Deterministic generator for the synthetic video temporal-grounding task (the video quickstart).

Each video is `duration` seconds of `size`×`size` frames at `fps` on a black background. Two objects, each a
coloured shape (`red circle`, `blue square`, ...) in its own half of the frame, are visible during their own
span of whole seconds [s, e) (`min_len` to `max_len` s long). A white progress bar along the bottom edge grows
with the elapsed time (`clock`). Each object gives one query:

    {"video": "videos/train_00012.mp4", "duration": 8.0, "query": "the red circle",
     "prompt": "When is the red circle visible?", "span": [2.0, 5.0],
     "completion": "<answer> 2.00 to 5.00 </answer>"}

Why this shape: a tiny random-init Qwen2.5-VL can learn it on a CPU in minutes (one vision token per temporal
patch at 28×28 pixels), yet it needs what real grounding needs: read the query, find the frames where the named
object is and turn them into seconds; the other object is a distractor. The progress bar is there because a
model this small, trained this briefly, does not learn to read time from its M-RoPE positions alone: without
it, SFT stalls at the span prior (always `0.00 to 8.00`); with it, the time of each frame is in its pixels.
Spans of 1–4 s in 8 s keep the prior weak (always answering the whole video scores mIoU ≈ 0.3).

Command line (writes train.jsonl, test.jsonl, corpus.txt, videos/ and README.md):

    python -m posttrain.tasks.grounding --out data/grounding [--n-train 1000 --n-test 100 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 80, 240), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square")
DEFAULTS = {"duration": 8, "fps": 2, "size": 28, "min_len": 1, "max_len": 4, "objects": 2, "clock": 1}


def answer(span) -> str:
    """The completion a span is written as (TempSamp-R1's reference format)."""
    return f"<answer> {span[0]:.2f} to {span[1]:.2f} </answer>"


def _objects(rng: random.Random, duration: int, min_len: int, max_len: int, count: int) -> list[dict]:
    colours = rng.sample(sorted(COLOURS), count)
    out = []
    for side, colour in enumerate(colours):
        length = rng.randint(min_len, min(max_len, duration))
        start = rng.randint(0, duration - length)
        out.append({"colour": colour, "shape": rng.choice(SHAPES), "side": side, "span": [float(start), float(start + length)]})
    return out


def _frames(objects: list[dict], duration: int, fps: int, size: int, clock: int = 1):
    import numpy as np

    t = duration * fps
    frames = np.zeros((t, size, size, 3), dtype=np.uint8)
    if clock:  # a white progress bar along the bottom edge: its length is the elapsed share of the video
        for k in range(t):
            frames[k, size - 3 :, : round(size * k / t)] = 255
    yy, xx = np.mgrid[0:size, 0:size]
    half = size // 2
    for obj in objects:
        cx, cy, r = obj["side"] * half + half // 2, size // 2, max(3, size // 5)
        if obj["shape"] == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            inside = (abs(xx - cx) <= r - 1) & (abs(yy - cy) <= r - 1)
        s, e = int(obj["span"][0] * fps), int(obj["span"][1] * fps)
        frames[s:e][:, inside] = COLOURS[obj["colour"]]
    return frames


def make_split(out: Path, split: str, n_videos: int, seed: int, duration: int = 8, fps: int = 2, size: int = 28,
               min_len: int = 1, max_len: int = 4, objects: int = 2, clock: int = 1) -> list[dict]:
    """Write `n_videos` videos of `split` under `out/videos/` and return their query rows (one per object)."""
    from posttrain.video import write_video

    rng = random.Random(f"{seed}-{split}")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n_videos):
        name = f"videos/{split}_{k:05d}.mp4"
        shown = _objects(rng, duration, min_len, max_len, objects)
        write_video(out / name, _frames(shown, duration, fps, size, clock), fps)
        for obj in shown:
            query = f"the {obj['colour']} {obj['shape']}"
            rows.append({"video": name, "duration": float(duration), "query": query,
                         "prompt": f"When is {query} visible? <video>", "span": obj["span"],
                         "completion": answer(obj["span"])})
    return rows


def write(out: Path, n_train: int, n_test: int, seed: int, **settings) -> dict[str, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": make_split(out, "train", n_train, seed, **settings),
              "test": make_split(out, "test", n_test, seed, **settings)}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    # the tokenizer corpus: every prompt and answer the task can produce
    lines = {r["prompt"] for rows in splits.values() for r in rows}
    lines |= {answer([float(s), float(e)]) for s in range(settings.get("duration", 8) + 1)
              for e in range(settings.get("duration", 8) + 1)}
    lines |= {"<think> the object appears then disappears </think>"}
    (out / "corpus.txt").write_text("\n".join(sorted(lines)) + "\n")
    (out / "README.md").write_text(
        "Generated by `python -m posttrain.tasks.grounding` (see posttrain/tasks/grounding.py): synthetic videos\n"
        f"of two coloured shapes, each visible for its own span; {n_train} train / {n_test} test videos, 2 queries\n"
        "each. Regenerate instead of editing.\n")
    return splits


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m posttrain.tasks.grounding",
                                          description="Write the synthetic video-grounding task.")
    p.add_argument("--out", required=True, help="output directory, e.g. data/grounding")
    p.add_argument("--n-train", type=int, default=1000, help="training videos (2 queries each)")
    p.add_argument("--n-test", type=int, default=100, help="test videos (2 queries each)")
    p.add_argument("--seed", type=int, default=0)
    for key, default in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=default)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    settings = {k: getattr(ns, k) for k in DEFAULTS}
    if not 1 <= settings["min_len"] <= settings["max_len"] <= settings["duration"] or settings["size"] % 2:
        print("error: need 1 <= min_len <= max_len <= duration and an even size", file=sys.stderr)
        return 2
    splits = write(Path(ns.out), ns.n_train, ns.n_test, ns.seed, **settings)
    print(f"wrote {ns.out}: {len(splits['train'])} train / {len(splits['test'])} test queries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
