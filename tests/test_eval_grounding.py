"""Video temporal-grounding metrics: span parsing, IoU, R1@θ, mIoU on hand-computed cases; annotation loaders
on ../shared/data; QVHighlights metrics equal to the official evaluation's published numbers."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from posttrain.evaluation.grounding import (detection_ap, grounding_metrics, qvhighlights_metrics, recall_at,
                                            saliency_ap, span_ious)
from posttrain.data import load_benchmark_rows
from posttrain.rewards.temporal import parse_span, temporal_iou, temporal_iou_reward

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "qvhighlights"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


@pytest.mark.parametrize("text, span", [
    ("<answer> 12.3 to 20.1 </answer>", (12.3, 20.1)),
    ("The event happens from 12.3s to 20.1s.", (12.3, 20.1)),
    ("from 12.3 seconds to 20.1 seconds", (12.3, 20.1)),
    ("[4.0, 9.5]", (4.0, 9.5)),
    ("01:05 - 01:20", (65.0, 80.0)),
    ("between 1:02:03.5 and 1:02:10", (3723.5, 3730.0)),
    ("<think>maybe 1 to 2</think><answer>30 to 40</answer>", (30.0, 40.0)),  # the answer tag wins
    ("first 1 to 2, finally 5 to 8", (5.0, 8.0)),  # the last span
    ("20 to 12", (12.0, 20.0)),  # backwards
    ("3–7 sec", (3.0, 7.0)),
    ([3, 7.5], (3.0, 7.5)),
    ("no idea", None), ("<answer>soon</answer>", None), ("", None), (None, None), ("12.3", None),
])
def test_parse_span(text, span):
    assert parse_span(text) == span


def test_parse_span_is_linear_on_adversarial_text():
    assert parse_span("9" * 100_000) is None
    assert parse_span("1 to " * 10_000 + "2") == (1.0, 2.0)


def test_temporal_iou_hand_values():
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert temporal_iou((0, 10), (0, 10)) == 1.0
    assert temporal_iou((0, 10), (20, 30)) == 0.0  # disjoint
    assert temporal_iou((2, 4), (0, 10)) == pytest.approx(0.2)  # contained
    assert temporal_iou((3, 3), (3, 3)) == 0.0  # empty union
    assert temporal_iou((0.3, 0.6), (0.3, 0.9)) == 0.4999999999999999  # the float trap ALGORITHMS.md names


def test_recall_uses_greater_equal_with_a_float_guard():
    iou = temporal_iou((0.3, 0.6), (0.3, 0.9))
    assert recall_at([iou], 0.5) == 1.0  # counts at 0.5 although it prints as 0.4999999999999999
    assert recall_at([0.5], 0.5) == 1.0 and recall_at([0.49], 0.5) == 0.0


def test_grounding_metrics_hand_computed():
    golds = [[0, 10], [0, 10], [0, 10], [0, 10]]
    preds = ["<answer> 0 to 10 </answer>", "from 0s to 4s", [5, 15], "I cannot tell"]
    ious = span_ious(preds, golds)
    assert ious == pytest.approx([1.0, 0.4, 1 / 3, 0.0])
    m = grounding_metrics(ious)
    assert m["R1@0.3"] == 0.75 and m["R1@0.5"] == 0.25 and m["R1@0.7"] == 0.25
    assert m["mIoU"] == pytest.approx((1 + 0.4 + 1 / 3) / 4)


def test_temporal_iou_reward_is_the_eval_iou():
    scores = temporal_iou_reward(completions=["<answer> 0 to 5 </answer>", "nothing", "1 to 2"],
                                 span=[[0, 10], [0, 10], None])
    assert scores == [0.5, 0.0, None]


def test_detection_ap_hand_computed():
    gts = [[0, 10], [20, 30]]
    # best-scored window hits gt 1, second misses, third hits gt 2: precision 1, 1/2, 2/3 at recall ½, ½, 1
    preds = [[0, 10, 0.9], [40, 50, 0.8], [20, 30, 0.7]]
    ap = detection_ap(gts, preds, thresholds=(0.5,))
    assert ap[0] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))  # VOC interpolation
    assert detection_ap(gts, [], thresholds=(0.5,))[0] == 0.0
    # the same ground truth cannot be matched twice
    assert detection_ap([[0, 10]], [[0, 10, 0.9], [0, 10, 0.8]], thresholds=(0.5,))[0] == 1.0


def test_saliency_ap_hand_computed():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # ranks: hit (P=1, R=½), miss, hit (P=2/3, R=1) → mean precision at recall changes: (1 + 2/3) / 2
    assert saliency_ap(y, scores) == pytest.approx((1 + 2 / 3) / 2)
    assert saliency_ap(np.zeros(3), scores[:3]) == 0.0 and saliency_ap(np.ones(3), scores[:3]) == 1.0


@needs_shared
def test_qvhighlights_metrics_equal_the_official_evaluation():
    """Expected numbers: standalone_eval/sample_val_preds_metrics_raw.json of jayleicn/moment_detr (commit
    b7e553ac), which its official eval.py computes for standalone_eval/sample_val_preds.jsonl (both copied to
    tests/fixtures/qvhighlights/)."""
    preds = [json.loads(line) for line in gzip.open(FIXTURES / "sample_val_preds.jsonl.gz", "rt")]
    gts = load_benchmark_rows(str(SHARED / "qvhighlights" / "highlight_val_release.jsonl"), "qvhighlights")
    official = json.loads((FIXTURES / "sample_val_preds_metrics_raw.json").read_text())["brief"]
    ours = {k: round(100 * v, 2) for k, v in qvhighlights_metrics(preds, gts, levels=("Fair", "Good", "VeryGood")).items()}
    assert ours["MR-mAP"] == official["MR-full-mAP"] == 32.2
    assert ours["MR-mAP@0.5"] == official["MR-full-mAP@0.5"]
    assert ours["MR-mAP@0.75"] == official["MR-full-mAP@0.75"]
    assert ours["MR-R1@0.5"] == official["MR-full-R1@0.5"]
    assert ours["MR-R1@0.7"] == official["MR-full-R1@0.7"]
    assert ours["HL-mAP"] == official["HL-min-VeryGood-mAP"] and ours["HL-HIT@1"] == official["HL-min-VeryGood-Hit1"]
    assert ours["HL-mAP-Good"] == official["HL-min-Good-mAP"] and ours["HL-HIT@1-Good"] == official["HL-min-Good-Hit1"]
    assert ours["HL-mAP-Fair"] == official["HL-min-Fair-mAP"] and ours["HL-HIT@1-Fair"] == official["HL-min-Fair-Hit1"]


@needs_shared
def test_annotation_loaders_read_the_shipped_formats():
    charades = load_benchmark_rows(str(SHARED / "charades_sta" / "charades_sta_test.txt"), "charades")
    assert len(charades) == 3720
    assert charades[0] == {"video": "3MSZA", "query": "person turn a light on.", "span": [24.3, 30.4], "duration": None}
    anet = load_benchmark_rows(str(SHARED / "activitynet_captions" / "val_2.json"), "activitynet")
    assert len(anet) == 17031 and anet[0]["video"] == "v_uqiMw7tQ1Cc" and anet[0]["span"] == [0.0, 4.14]
    assert anet[0]["duration"] == 55.15 and not anet[1]["query"].startswith(" ")
    qvh = load_benchmark_rows(str(SHARED / "qvhighlights" / "highlight_val_release.jsonl"), "qvhighlights")
    assert len(qvh) == 1550 and qvh[0]["span"] == [82.0, 150.0] and qvh[0]["video"] == qvh[0]["vid"]
