"""The synthetic grounding task generator (posttrain/tasks/grounding.py)."""

import json

import pytest

from posttrain.tasks.grounding import answer, main

pytest.importorskip("av")


def test_rows_videos_and_determinism(tmp_path, grounding_data):
    rows = [json.loads(l) for l in (grounding_data / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12  # 6 videos × 2 objects
    for a, b in zip(rows[::2], rows[1::2]):
        assert a["video"] == b["video"] and a["query"] != b["query"]
        assert a["query"].split()[1] != b["query"].split()[1]  # two different colours: one is a distractor
    for r in rows:
        s, e = r["span"]
        assert 0 <= s < e <= r["duration"] == 8.0 and 1 <= e - s <= 4 and s == int(s) and e == int(e)
        assert r["completion"] == answer(r["span"]) == f"<answer> {s:.2f} to {e:.2f} </answer>"
        assert r["prompt"] == f"When is {r['query']} visible? <video>"
        assert (grounding_data / r["video"]).is_file()
    assert main(["--out", str(tmp_path / "again"), "--n-train", "6", "--n-test", "2"]) == 0
    assert (tmp_path / "again" / "train.jsonl").read_text() == (grounding_data / "train.jsonl").read_text()


def test_frames_show_the_object_exactly_during_its_span(grounding_data):
    from posttrain import video

    row = json.loads((grounding_data / "train.jsonl").read_text().splitlines()[0])
    clip = video.decode(grounding_data / row["video"], video.VideoSettings(fps=2, max_frames=16))
    colour = {"red": 0, "green": 1, "blue": 2, "yellow": 0}[row["query"].split()[1]]
    side = 7  # a video's first query names the object in the left half (x = 7 of 28)
    lit = [bool(f[14, side, colour] > 128) for f in clip.frames]
    s, e = row["span"]
    assert lit == [s <= t < e for t in clip.timestamps]
    # the progress bar grows with time
    bar = [int((f[-2, :, :] > 200).all(-1).sum()) for f in clip.frames]
    assert bar == sorted(bar) and bar[0] == 0 and bar[-1] > 20
