"""Faults of `posttrain eval` found by fault injection and a new user: malformed predictions files end in an
exit-2 message naming file:line (or a count), the JSON it writes is strict, `--videos` takes the folder of the
files or the one above it, a grounding samples.jsonl scores again as a predictions file to the same metrics, and
a predictions file covering part of the queries says so on the console."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain.cli import main
from posttrain.errors import UserError


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(grounding_data) -> list[dict]:
    return [json.loads(line) for line in (grounding_data / "test.jsonl").read_text().splitlines()]


def _pred(row: dict, prediction) -> str:
    return json.dumps({"video": row["video"], "query": row["query"], "prediction": prediction})


def _score(tmp_path, preds: Path, data: Path, *extra: str) -> int:
    return main(["eval", "--predictions", str(preds), "--bench", "grounding_quickstart", "--data", str(data),
                 "--out", str(tmp_path / "out"), *extra])


# ------------------------------------------------------------------------- 1. malformed predictions rows


@pytest.mark.parametrize("bad, shown", [("null", "null"), ("5", "the number 5"), ("[1, 2]", "a list"),
                                        ('"text"', "the string 'text'"), ("true", "true")])
def test_a_row_that_is_not_an_object_is_an_error_naming_file_and_line(grounding_data, tmp_path, capsys, bad, shown):
    rows = _rows(grounding_data)
    preds = _jsonl(tmp_path / "p.jsonl", [_pred(rows[0], [5.0, 6.0]), "", bad, _pred(rows[1], [2.0, 6.0])])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{preds}:3: expected a JSON object" in err and shown in err and '"video"' in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_video_or_query_of_the_wrong_type_is_an_error(grounding_data, tmp_path, capsys):
    row = _rows(grounding_data)[0]
    listed = json.dumps({"video": [row["video"]], "query": row["query"], "prediction": "x"})
    preds = _jsonl(tmp_path / "p.jsonl", [_pred(row, "x"), listed])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{preds}:2: `video` must be the annotation's video id (a string), got a list" in err

    _jsonl(preds, [json.dumps({"video": row["video"], "query": None, "prediction": "x"})])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 2
    assert f"{preds}:1: `query` must be the query text (a string), got null" in capsys.readouterr().err

    _jsonl(preds, [json.dumps({"video": row["video"], "query": row["query"]})])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 2
    assert f"{preds}:1: no `prediction`; each row needs" in capsys.readouterr().err

    _jsonl(preds, ['{"video": "a", '])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 2
    assert f"{preds}:1: not valid JSON" in capsys.readouterr().err


def test_predictions_naming_no_span_count_as_iou_0(grounding_data, tmp_path, capsys):
    """null, a number and an object are predictions that name no span: IoU 0 and counted, as unparsable text."""
    rows = _rows(grounding_data)
    preds = _jsonl(tmp_path / "p.jsonl", [_pred(rows[0], rows[0]["span"]), _pred(rows[1], None), _pred(rows[2], 3),
                                          _pred(rows[3], {"start": 1})])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["metrics"]["grounding_quickstart"]["mIoU"] == pytest.approx(0.25)
    assert doc["info"]["grounding_quickstart"]["unparsable_predictions"] == 3
    assert "3 predictions name no finite span and count as IoU 0 (lines 2, 3, 4)" in capsys.readouterr().err


def test_rows_matching_no_annotation_are_counted_and_none_matching_is_an_error(grounding_data, tmp_path, capsys):
    rows = _rows(grounding_data)
    preds = _jsonl(tmp_path / "p.jsonl", [_pred(rows[0], rows[0]["span"]), _pred({**rows[0], "video": "nope"}, "x"),
                                          _pred(rows[0], "again")])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["info"]["grounding_quickstart"][
        "unmatched_predictions"] == 2
    assert "2 rows of" in capsys.readouterr().err

    _jsonl(preds, [_pred({**rows[0], "video": "nope"}, "x")])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{preds}: no row matches an annotation" in err and "line 1 has video 'nope'" in err


def _qvh_data(tmp_path) -> Path:
    rows = [{"qid": q, "query": f"query {q}", "duration": 10, "vid": f"v{q}", "relevant_windows": [[2, 6]],
             "relevant_clip_ids": [1, 2], "saliency_scores": [[4, 4, 4], [2, 2, 2]]} for q in (1, 2, 3, 4)]
    return _jsonl(tmp_path / "qvh.jsonl", [json.dumps(r) for r in rows])


@pytest.mark.parametrize("bad, message", [
    ("null", ":2: expected a JSON object"),
    ('{"qid": [1], "pred_relevant_windows": [[2, 6, 1]]}', ":2: `qid` must be the query id (an integer), got a list"),
    ('{"qid": 2, "pred_relevant_windows": [[2, "a", 1]]}', ":2: `pred_relevant_windows` must be [start, end, score]"),
    ('{"qid": 2, "pred_relevant_windows": []}', ":2: `pred_relevant_windows` must be a non-empty list"),
    ('{"qid": 2, "pred_saliency_scores": [NaN, 1]}', ":2: `pred_saliency_scores` must be a non-empty list of finite"),
    ('{"qid": 2}', ":2: no `pred_relevant_windows`, `pred_saliency_scores` or `prediction`"),
    ('{"qid": 2, "pred_saliency_scores": [1, 2]}', ":2: no `pred_relevant_windows`, which line 1 has"),
])
def test_qvhighlights_rows_are_checked(tmp_path, capsys, bad, message):
    data = _qvh_data(tmp_path)
    preds = _jsonl(tmp_path / "p.jsonl", ['{"qid": 1, "pred_relevant_windows": [[2, 6, 1]]}', bad])
    assert main(["eval", "--predictions", str(preds), "--bench", "qvhighlights", "--data", str(data),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{preds}{message}" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- 2. strict JSON


def test_dumps_writes_non_finite_numbers_as_null():
    import numpy as np

    from posttrain.evaluation.report import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), (1.5, -float("inf"))], "c": np.float64("nan"),
                  "d": np.array([1.0, np.nan]), "e": np.int64(3), "f": Path("x")})
    assert _strict(text) == {"a": None, "b": [None, [1.5, None]], "c": None, "d": [1.0, None], "e": 3, "f": "x"}


def test_nan_spans_are_written_as_strict_json(grounding_data, tmp_path):
    """A NaN prediction and a NaN annotation (bare `NaN` in the input, which Python's json reads) give IoU 0 and
    `null` in samples.jsonl and results.json, never a bare NaN."""
    rows = _rows(grounding_data)
    data = _jsonl(tmp_path / "test.jsonl", [json.dumps({**rows[0], "span": [float("nan"), 6.0]})]
                  + [json.dumps(r) for r in rows[1:]])
    assert "NaN" in data.read_text()
    preds = _jsonl(tmp_path / "p.jsonl", [_pred(rows[0], rows[0]["span"]), _pred(rows[1], [float("nan"), 5.0]),
                                          _pred(rows[2], [float("-inf"), float("inf")]),
                                          _pred(rows[3], rows[3]["span"])])
    assert _score(tmp_path, preds, data) == 0
    samples = [_strict(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["iou"] for s in samples] == [0.0, 0.0, 0.0, 1.0]
    assert samples[0]["span"] == [None, 6.0] and samples[1]["prediction"] == [None, 5.0]
    assert samples[1]["parsed"] is None and samples[2]["parsed"] is None
    doc = _strict((tmp_path / "out" / "results.json").read_text())
    assert doc["metrics"]["grounding_quickstart"]["mIoU"] == 0.25
    assert doc["info"]["grounding_quickstart"]["bad_annotations"] == 1
    assert doc["info"]["grounding_quickstart"]["unparsable_predictions"] == 2


def test_training_eval_rows_are_strict_json(tmp_path):
    """eval.jsonl and eval/<label>.jsonl of a training run go through the same strict writer."""
    from posttrain.evaluation.training import TrainingEval

    evaluation = TrainingEval.__new__(TrainingEval)
    evaluation.run_dir, evaluation.first = tmp_path, "b"
    evaluation.log = SimpleNamespace(log_extra=lambda *a: None)
    result = SimpleNamespace(metrics={"mIoU": float("nan")}, samples=[{"iou": float("nan")}], info={"problems": 1})
    row = evaluation._record({"b": result}, "m", "s", 0)
    assert _strict((tmp_path / "eval" / "m.jsonl").read_text()) == {"iou": None}
    from posttrain.evaluation.report import dumps

    assert _strict(dumps(row))["accuracy"] is None


# ------------------------------------------------------------------------------------- 3. --videos


def test_videos_may_be_the_folder_of_the_files_or_its_parent(grounding_data, tmp_path):
    from posttrain.evaluation.runner import find_video_dir
    from posttrain.recipe.benchmark import load_spec

    rows = _rows(grounding_data)  # rows name `videos/test_00000.mp4`
    for given in (grounding_data, grounding_data / "videos"):
        spec = load_spec("grounding_quickstart", {"video": {"dir": str(given)}})
        assert Path(find_video_dir(spec, rows)) == grounding_data
    # Charades-style bare ids: the folder above `videos/` works too
    (tmp_path / "videos").mkdir()
    shutil.copy(grounding_data / rows[0]["video"], tmp_path / "videos" / "AO8RW.mp4")
    spec = load_spec("charades_sta", {"video": {"dir": str(tmp_path)}})
    assert Path(find_video_dir(spec, [{"video": "AO8RW"}])) == tmp_path / "videos"
    spec = load_spec("charades_sta", {"video": {"dir": str(tmp_path / "videos")}})
    assert Path(find_video_dir(spec, [{"video": "AO8RW"}])) == tmp_path / "videos"


def test_videos_in_no_tried_folder_is_an_error_naming_them(grounding_data, tmp_path, capsys):
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    code = main(["eval", "some-model-never-loaded", "--bench", "grounding_quickstart", "--data",
                 str(grounding_data / "test.jsonl"), "--videos", str(wrong), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "`videos/test_00000.mp4` is in none of" in err
    assert f"`{wrong}`" in err and f"`{wrong / 'videos'}`" in err and f"`{tmp_path}`" in err
    assert "folder holding the video files or the folder above it" in err

    from posttrain.evaluation.runner import find_video_dir
    from posttrain.recipe.benchmark import load_spec

    with pytest.raises(UserError, match="no video folder is given: pass --videos DIR"):
        find_video_dir(load_spec("charades_sta"), [{"video": "AO8RW"}])


def test_eval_with_videos_naming_the_videos_folder(grounding_data, tiny_vlm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(tiny_vlm_dir), "--bench", "grounding_quickstart", "--data",
                 str(grounding_data / "test.jsonl"), "--videos", str(grounding_data / "videos"), "--limit", "2",
                 "--out", str(out)]) == 0
    assert "reading videos from" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    info = doc["info"]["grounding_quickstart"]
    assert info["skipped_videos"] == 0 and info["queries"] == 2


# ------------------------------------------------------------------- 4. samples.jsonl as predictions


def test_eval_samples_score_again_to_the_same_metrics(grounding_data, tiny_vlm_dir, tmp_path):
    """The real tiny VLM: eval → samples.jsonl → --predictions: same metrics, every query matched."""
    data = str(grounding_data / "test.jsonl")
    assert main(["eval", str(tiny_vlm_dir), "--bench", "grounding_quickstart", "--data", data, "--videos",
                 str(grounding_data), "--out", str(tmp_path / "eval")]) == 0
    assert main(["eval", "--predictions", str(tmp_path / "eval" / "samples.jsonl"), "--bench", "grounding_quickstart",
                 "--data", data, "--out", str(tmp_path / "scored")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert scored["metrics"] == evaluated["metrics"]
    info = scored["info"]["grounding_quickstart"]
    assert info["missing_predictions"] == 0 and info["unmatched_predictions"] == 0 and info["predicted"] == 4
    first = json.loads((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert first["query"] == _rows(grounding_data)[0]["query"] and "prediction" in first


class _ScriptedEngine:
    """Answers the queries with fixed texts, in order (the eval's rows come in file order)."""

    def __init__(self, path, texts):
        self.path, self.texts = str(path), list(texts)

    def generate(self, prompts, sampling):
        from posttrain.rollout.base import Completion

        out = []
        for i, _ in enumerate(prompts):
            text = self.texts.pop(0)
            out.append([Completion(i, [1, 2], text, None, "stop")])
        return out


def test_round_trip_with_non_trivial_metrics_and_old_samples_files(grounding_data, tiny_vlm_dir, tmp_path, monkeypatch):
    from posttrain.evaluation import cli as eval_cli
    from posttrain.models import load_tokenizer

    rows = _rows(grounding_data)
    (s0, e0), (s1, e1), (s3, e3) = rows[0]["span"], rows[1]["span"], rows[3]["span"]
    texts = [f"<answer> {s0:.2f} to {e0:.2f} </answer>", f"<answer> {s1} to {(s1 + e1) / 2} </answer>", "no idea",
             f"from {s3}s to {e3}s"]
    engine = _ScriptedEngine(tiny_vlm_dir, texts)
    monkeypatch.setattr(eval_cli, "make_eval_engine", lambda *a: (engine, load_tokenizer(str(tiny_vlm_dir))))
    data = str(grounding_data / "test.jsonl")
    assert main(["eval", str(tiny_vlm_dir), "--bench", "grounding_quickstart", "--data", data, "--videos",
                 str(grounding_data), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]["grounding_quickstart"]
    assert evaluated["R1@0.5"] == 0.75 and evaluated["R1@0.7"] == 0.5 and evaluated["mIoU"] == pytest.approx(2.5 / 4)

    samples = tmp_path / "eval" / "samples.jsonl"
    assert main(["eval", "--predictions", str(samples), "--bench", "grounding_quickstart", "--data", data,
                 "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert scored["metrics"]["grounding_quickstart"] == evaluated

    # samples.jsonl as written before: `query` held the prompt column, no `prediction` (only `completion`)
    old = []
    for line, row in zip(samples.read_text().splitlines(), rows):
        sample = json.loads(line)
        sample["query"] = row["prompt"]
        del sample["prediction"]
        old.append(json.dumps(sample))
    old_file = _jsonl(tmp_path / "old.jsonl", old)
    assert main(["eval", "--predictions", str(old_file), "--bench", "grounding_quickstart", "--data", data,
                 "--out", str(tmp_path / "old")]) == 0
    assert json.loads((tmp_path / "old" / "results.json").read_text())["metrics"]["grounding_quickstart"] == evaluated

    # the samples of a predictions scoring are a predictions file too
    assert main(["eval", "--predictions", str(tmp_path / "scored" / "samples.jsonl"), "--bench", "grounding_quickstart",
                 "--data", data, "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text())["metrics"]["grounding_quickstart"] == evaluated


def test_samples_of_several_benchmarks_keep_only_this_ones_rows(grounding_data, tmp_path):
    rows = _rows(grounding_data)
    lines = [json.dumps({"benchmark": "grounding_quickstart", "video": r["video"], "query": r["query"],
                         "prediction": r["span"]}) for r in rows]
    lines.insert(1, json.dumps({"benchmark": "gsm8k", "index": 0, "prompt": "1+1", "completions": ["2"]}))
    assert _score(tmp_path, _jsonl(tmp_path / "s.jsonl", lines), grounding_data / "test.jsonl") == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["metrics"]["grounding_quickstart"]["mIoU"] == 1.0
    assert doc["info"]["grounding_quickstart"]["other_benchmark_rows"] == 1


def test_qvhighlights_samples_rows_score_as_one_window(tmp_path):
    from posttrain.evaluation.predictions import score_predictions
    from posttrain.recipe.benchmark import load_spec

    data = _qvh_data(tmp_path)
    spec = load_spec("qvhighlights")
    texts = ((1, "<answer> 2 to 6 </answer>"), (2, "<answer> 2 to 4 </answer>"), (3, "no idea"),
             (4, "<answer> 0 to 6 </answer>"))
    samples = _jsonl(tmp_path / "s.jsonl", [json.dumps({"benchmark": "qvhighlights", "qid": q, "video": f"v{q}",
                                                        "query": f"query {q}", "prediction": text})
                                            for q, text in texts])
    official = _jsonl(tmp_path / "o.jsonl", [json.dumps({"qid": q, "pred_relevant_windows": [w]}) for q, w in
                                             ((1, [2, 6, 1.0]), (2, [2, 4, 1.0]), (3, [0, 0, 1.0]), (4, [0, 6, 1.0]))])
    a = score_predictions(spec, str(samples), str(data))
    b = score_predictions(spec, str(official), str(data))
    assert a.metrics == b.metrics and a.metrics["MR-R1@0.5"] == 0.75 and a.metrics["MR-R1@0.7"] == 0.25
    assert not a.warnings and a.info["other_benchmark_rows"] == 0


# --------------------------------------------------------------------------- 5. partial coverage warns


def test_partial_predictions_warn_with_the_covered_count(grounding_data, tmp_path, capsys):
    rows = _rows(grounding_data)
    preds = _jsonl(tmp_path / "p.jsonl", [_pred(rows[2], rows[2]["span"])])
    assert _score(tmp_path, preds, grounding_data / "test.jsonl") == 0
    captured = capsys.readouterr()
    assert (f"[posttrain] warning: grounding_quickstart: `{preds}` predicts 1 of 4 queries (25.0 %); the 3 without a "
            f"prediction count as IoU 0 (R1@θ and mIoU are over all 4 queries)") in captured.err
    assert "| grounding_quickstart | 25.00 |" in captured.out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    info = doc["info"]["grounding_quickstart"]
    assert info["missing_predictions"] == 3 and info["predicted"] == 1 and info["queries"] == 4
    assert doc["metrics"]["grounding_quickstart"]["mIoU"] == 0.25

    # full coverage: no warning; --limit bounds the queries that must be covered
    full = _jsonl(tmp_path / "full.jsonl", [_pred(r, r["span"]) for r in rows[:2]])
    assert _score(tmp_path, full, grounding_data / "test.jsonl", "--limit", "2") == 0
    assert "warning" not in capsys.readouterr().err


def test_partial_qvhighlights_predictions_warn_that_only_predicted_queries_count(tmp_path, capsys):
    data = _qvh_data(tmp_path)
    preds = _jsonl(tmp_path / "p.jsonl", ['{"qid": 1, "pred_relevant_windows": [[2, 6, 1]]}'])
    assert main(["eval", "--predictions", str(preds), "--bench", "qvhighlights", "--data", str(data),
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "predicts 1 of 4 annotated queries (25.0 %); the QVHighlights metrics average over the predicted queries " \
           "only" in err
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["metrics"]["qvhighlights"]["MR-R1@0.5"] == 1.0
    assert doc["info"]["qvhighlights"]["missing_predictions"] == 3
