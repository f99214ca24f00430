"""Video temporal-grounding metrics. Pure numpy; values are fractions in [0, 1] (papers print ×100).

Charades-STA / ActivityNet Captions (one ground-truth span per query, one predicted span):
    R1@θ  the share of queries whose predicted span has IoU ≥ θ with the ground truth (θ = 0.3, 0.5, 0.7).
          `≥` with a guard of 1e-9: [0.3, 0.6] vs [0.3, 0.9] has IoU 0.4999999999999999 in floating point and
          counts at θ = 0.5, as it does exactly.
    mIoU  the mean IoU; an unparsable prediction (or a non-finite span, e.g. [NaN, 5]) has IoU 0.

QVHighlights (Lei et al. 2021): the metrics of the official `standalone_eval/eval.py` (jayleicn/moment_detr),
re-implemented here and checked against its published numbers on its own sample predictions
(tests/test_eval_grounding.py):
    MR-mAP      moment retrieval: per query, average precision of its (≤ 10) scored windows against its
                ground-truth windows at IoU 0.5, 0.55, …, 0.95 (greedy matching in score order, each ground truth
                matched once, VOC-style interpolated AP); mean over queries, then over thresholds. MR-mAP@0.5 and
                MR-mAP@0.75 are single thresholds.
    MR-R1@θ     the top-scored window has IoU ≥ θ with the ground-truth window it overlaps most.
    HL-mAP      highlight detection: per query and per annotator, AP of the predicted clip saliency against the
                clips that annotator rated ≥ 4 ("Very Good", the threshold papers report); mean over both.
    HL-HIT@1    the top-scored clip is rated ≥ 4 by at least one annotator.
The official script also reports "Fair" (≥ 2) and "Good" (≥ 3) highlight levels and short/middle/long splits;
`qvhighlights_metrics(..., levels=...)` gives the other levels.
"""

from __future__ import annotations

import math

import numpy as np

from posttrain.rewards.temporal import parse_span, temporal_iou

GUARD = 1e-9
R1_THRESHOLDS = (0.3, 0.5, 0.7)
MR_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95
HL_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}


# ------------------------------------------------------------------------------ Charades-STA, ActivityNet


def finite_span(value) -> tuple[float, float] | None:
    """`parse_span(value)` (model text or a [start, end] pair), or None when it names no span or a bound is not a
    finite number (`[NaN, 5]`, a 400-digit time that overflows to infinity): such a span has no IoU to speak of."""
    span = parse_span(value)
    return span if span is not None and all(math.isfinite(v) for v in span) else None


def span_ious(predictions: list, golds: list) -> list[float]:
    """IoU of each prediction (model text or a [start, end] pair) with its ground-truth span; 0 if either is
    unparsable or not finite (see `finite_span`)."""
    out = []
    for pred, gold in zip(predictions, golds):
        span, truth = finite_span(pred), finite_span(gold)
        out.append(0.0 if span is None or truth is None else temporal_iou(span, truth))
    return out


def recall_at(ious: list[float], threshold: float) -> float:
    """Share of IoUs ≥ threshold (with the float guard, see module doc)."""
    return sum(iou + GUARD >= threshold for iou in ious) / len(ious) if ious else 0.0


def grounding_metrics(ious: list[float], thresholds=R1_THRESHOLDS) -> dict[str, float]:
    """`R1@θ` for each threshold and `mIoU`."""
    out = {f"R1@{t}": recall_at(ious, t) for t in thresholds}
    out["mIoU"] = sum(ious) / len(ious) if ious else 0.0
    return out


# ------------------------------------------------------------------------------------------- QVHighlights


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross IoU `[len(a), len(b)]` of [start, end] rows, with the true union |a| + |b| − |a ∩ b|
    (the official AP code's choice)."""
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def _interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC 2011 AP: precision made monotone from the right, summed over recall steps."""
    p = np.concatenate([[0.0], precision, [0.0]])
    r = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(p) - 2, -1, -1):
        p[i] = max(p[i], p[i + 1])
    steps = np.where(r[1:] != r[:-1])[0] + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def detection_ap(gts: list, preds: list, thresholds=MR_THRESHOLDS) -> np.ndarray:
    """AP of one query's scored windows `[[s, e, score], ...]` against its ground-truth windows, per threshold.

    Predictions are taken in decreasing score (stable); each is a true positive for the unmatched ground truth
    of highest IoU ≥ θ, else a false positive."""
    ap = np.zeros(len(thresholds))
    if not preds:
        return ap
    order = sorted(range(len(preds)), key=lambda i: -preds[i][2])  # stable, as list.sort
    windows = np.array([[preds[i][0], preds[i][1]] for i in order], dtype=float)
    gt = np.array([[g[0], g[1]] for g in gts], dtype=float).reshape(-1, 2)
    tp = np.zeros((len(thresholds), len(order)))
    fp = np.zeros_like(tp)
    taken = np.zeros((len(thresholds), len(gt)), dtype=bool)
    ious = _iou_matrix(windows, gt) if len(gt) else np.zeros((len(order), 0))
    for j in range(len(order)):
        by_iou = ious[j].argsort()[::-1]
        for t, threshold in enumerate(thresholds):
            for g in by_iou:
                if ious[j, g] < threshold:
                    break
                if not taken[t, g]:
                    tp[t, j], taken[t, g] = 1, True
                    break
            if not tp[t, j]:
                fp[t, j] = 1
    tp_sum, fp_sum = np.cumsum(tp, 1), np.cumsum(fp, 1)
    recall = tp_sum / len(gt) if len(gt) else np.zeros_like(tp_sum)
    precision = tp_sum / (tp_sum + fp_sum)
    return np.array([_interpolated_ap(precision[t], recall[t]) for t in range(len(thresholds))])


def saliency_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP of clip scores against binary labels, as the official `get_ap` (video2gif) computes it: precision at
    each distinct score threshold, made non-decreasing towards lower recall, averaged where recall changes.
    All-negative labels give 0, all-positive 1."""
    if len(set(y_true.tolist())) == 1:
        return float(y_true[0] != 0)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], y_true[order]
    last = np.r_[np.where(np.diff(s))[0], len(s) - 1]  # the last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]  # from the lowest threshold up, then (recall 0, prec. 1)
    recall = np.r_[(tps / tps[-1])[::-1], 0.0].astype(np.float32)
    precision = np.maximum.accumulate(precision)
    return float(np.mean(precision[np.where(np.diff(recall))]))


def _clip_labels(gt: dict, clip_length: float = 2.0) -> np.ndarray:
    """`[clips, 3]` saliency ratings (0–4) of every clip of the video; unrated clips 0."""
    labels = np.zeros((int(gt["duration"] / clip_length), 3))
    labels[np.array(gt["relevant_clip_ids"], dtype=int)] = np.array(gt["saliency_scores"])
    return labels


def _fit(scores, n: int) -> np.ndarray:
    """Predicted clip scores cut or zero-padded to the video's clip count (as the official code)."""
    scores = np.asarray(scores, dtype=float)[:n]
    return np.pad(scores, (0, n - len(scores)))


def qvhighlights_metrics(predictions: list[dict], ground_truth: list[dict], levels=("VeryGood",),
                         max_windows: int = 10) -> dict[str, float]:
    """The official metrics for predictions in the submission format (`qid`, `pred_relevant_windows`
    [[s, e, score], ...] best first, `pred_saliency_scores` one per 2-s clip) on the queries they share
    with `ground_truth` (rows of the annotation jsonl)."""
    gt_by_qid = {g["qid"]: g for g in ground_truth}
    preds = [p for p in predictions if p["qid"] in gt_by_qid]
    out: dict[str, float] = {}
    if preds and "pred_relevant_windows" in preds[0]:
        aps = np.array([detection_ap(gt_by_qid[p["qid"]]["relevant_windows"],
                                     p["pred_relevant_windows"][:max_windows]) for p in preds])
        per_threshold = aps.mean(0)
        out["MR-mAP"] = float(per_threshold.mean())
        out["MR-mAP@0.5"] = float(per_threshold[MR_THRESHOLDS.index(0.5)])
        out["MR-mAP@0.75"] = float(per_threshold[MR_THRESHOLDS.index(0.75)])
        ious = []
        for p in preds:
            top = np.array([p["pred_relevant_windows"][0][:2]], dtype=float)
            gts = np.array(gt_by_qid[p["qid"]]["relevant_windows"], dtype=float).reshape(-1, 2)
            best = gts[int(np.argmax(_iou_matrix(top, gts)[0]))]  # the GT window it overlaps most
            ious.append(temporal_iou(top[0], best))
        for t in (0.5, 0.7):
            out[f"MR-R1@{t}"] = float(np.mean(np.array(ious) >= t))
    if preds and "pred_saliency_scores" in preds[0]:
        for level in levels:
            minimum = HL_LEVELS[level]
            aps, hits = [], []
            for p in preds:
                labels = (_clip_labels(gt_by_qid[p["qid"]]) >= minimum).astype(float)
                scores = _fit(p["pred_saliency_scores"], len(labels))
                aps += [saliency_ap(labels[:, a], scores) for a in range(3)]
                top = int(np.argmax(p["pred_saliency_scores"]))
                hits.append(float(labels[top].max()) if top < len(labels) else 0.0)
            suffix = "" if level == "VeryGood" else f"-{level}"
            out[f"HL-mAP{suffix}"] = float(np.mean(aps))
            out[f"HL-HIT@1{suffix}"] = float(np.mean(hits))
    return out
