"""`posttrain eval` end to end on a tiny model (every math benchmark, from the CLI), prediction files for the
grounding benchmarks, and the errors a user sees for bad specs and missing data."""

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.evaluation.spec import available_specs, load_spec, render_template

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MATH = ["gsm8k", "math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "quickstart"]
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-init model with a byte-level tokenizer and chat template, as `posttrain new-model` writes."""
    from posttrain.modeling import new_model

    return new_model(tmp_path_factory.mktemp("eval-model"), hidden=32, layers=2, heads=4, kv_heads=2,
                     max_position=1024, vocab_size=300, tokenizer_corpus=[REPO / "data/quickstart/corpus.txt"])


def test_every_spec_validates_and_names_its_data():
    assert set(MATH) | {"charades_sta", "activitynet", "qvhighlights"} <= set(available_specs())
    for name in available_specs():
        spec = load_spec(name)
        assert spec.name == name
        if spec.data.path is None:  # not shipped: the spec must say what it is and where to get it
            assert spec.data.note and "not shipped" in spec.data.note
        else:
            assert (REPO / spec.data.path).is_file()
            assert list((REPO / spec.data.path).parent.glob("LICENSE*")) or name == "quickstart"


@needs_shared
def test_every_math_benchmark_evaluates_from_the_cli(model_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["eval", str(model_dir), "--bench", ",".join(MATH), "--limit", "2", "--n", "2", "--max-tokens", "4",
                 "--data", f"minerva_math={SHARED / 'minerva_math' / 'test.jsonl'}", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["metrics"]) == set(MATH) | {"average"}
    for name in MATH:
        assert set(doc["metrics"][name]) == {"pass@1", "pass@2", "maj@2", "avg@2"}
        assert all(0.0 <= v <= 1.0 for v in doc["metrics"][name].values())
        assert doc["config"][name]["n"] == 2 and doc["config"][name]["temperature"] == 0.6  # n > 1 samples
        assert doc["info"][name]["problems"] == 2 and doc["info"][name]["samples"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * len(MATH)
    for s in samples:
        assert len(s["completions"]) == len(s["scores"]) == len(s["answers"]) == 2
    gsm = next(s for s in samples if s["benchmark"] == "gsm8k")
    assert "\\boxed{}" in gsm["prompt"] and "<|im_start|>" in gsm["prompt"]  # template + chat template
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in MATH) and "| average |" in table
    assert (out / "results.png").stat().st_size > 1000


def test_sets_that_are_not_shipped_say_where_to_get_them(model_dir, capsys):
    assert main(["eval", str(model_dir), "--bench", "minerva_math"]) == 2
    err = capsys.readouterr().err
    assert "minerva_math" in err and "CC BY-NC-SA" in err and "`--data minerva_math=PATH`" in err


def test_unknown_benchmark_and_bad_k(model_dir, capsys):
    assert main(["eval", str(model_dir), "--bench", "gsm8kk"]) == 2
    assert "did you mean `gsm8k`" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--bench", "gsm8k", "--n", "2", "--k", "1,4"]) == 2
    assert "metrics.k [4] must lie in 1..sampling.n (2)" in capsys.readouterr().err


def test_spec_file_errors_name_the_file_line_and_key(tmp_path, capsys):
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\ndata: {path: x.jsonl}\npromt: {column: q}\nsampling: {n: 0}\n")
    assert main(["eval", "some-model", "--bench", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:3: promt: unknown key (did you mean `prompt`?)" in err
    assert f"{spec}:4: sampling.n: input should be greater than 0" in err


def test_render_template_fills_columns_and_keeps_latex():
    row = {"question": "1+1?", "duration": 30.25}
    assert render_template("{question} Put it in \\boxed{}. {missing}", row) == "1+1? Put it in \\boxed{}. {missing}"
    assert render_template("lasts {duration:.1f} s", row) == "lasts 30.2 s"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_shared
def test_charades_predictions_file(tmp_path):
    """The first 4 queries, predicted exactly, half-overlapping, unparsably, and not at all."""
    from posttrain.evaluation.loaders import charades_rows

    gts = charades_rows(str(SHARED / "charades_sta" / "charades_sta_test.txt"))[:4]
    (s0, e0), (s1, e1) = gts[0]["span"], gts[1]["span"]
    preds = [
        {"video": gts[0]["video"], "query": gts[0]["query"], "prediction": f"<answer> {s0} to {e0} </answer>"},
        {"video": gts[1]["video"], "query": gts[1]["query"], "prediction": [s1, (s1 + e1) / 2]},  # IoU 0.5
        {"video": gts[2]["video"], "query": gts[2]["query"], "prediction": "no idea"},
    ]
    out = tmp_path / "out"
    code = main(["eval", "--predictions", str(_write(tmp_path / "p.jsonl", preds)), "--bench", "charades_sta",
                 "--data", str(SHARED / "charades_sta" / "charades_sta_test.txt"), "--limit", "4", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    m = doc["metrics"]["charades_sta"]
    assert m["R1@0.3"] == 0.5 and m["R1@0.5"] == 0.5 and m["R1@0.7"] == 0.25
    assert m["mIoU"] == pytest.approx((1.0 + 0.5) / 4)
    assert doc["info"]["charades_sta"]["missing_predictions"] == 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["iou"] for s in samples] == pytest.approx([1.0, 0.5, 0.0, 0.0]) and samples[0]["parsed"] == [s0, e0]


@needs_shared
def test_activitynet_and_qvhighlights_prediction_files(tmp_path):
    import gzip
    import shutil

    from posttrain.evaluation.loaders import activitynet_rows

    gts = activitynet_rows(str(SHARED / "activitynet_captions" / "val_2.json"))[:2]
    preds = [{"video": g["video"], "query": g["query"], "prediction": f"from {g['span'][0]}s to {g['span'][1]}s"}
             for g in gts[:1]]
    out = tmp_path / "anet"
    assert main(["eval", "--predictions", str(_write(tmp_path / "a.jsonl", preds)), "--bench", "activitynet",
                 "--data", str(SHARED / "activitynet_captions" / "val_2.json"), "--limit", "2", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["activitynet"]["R1@0.7"] == 0.5

    sample = tmp_path / "qvh.jsonl"
    with gzip.open(REPO / "tests/fixtures/qvhighlights/sample_val_preds.jsonl.gz", "rb") as src, open(sample, "wb") as dst:
        shutil.copyfileobj(src, dst)
    out = tmp_path / "qvh"
    assert main(["eval", "--predictions", str(sample), "--bench", "qvhighlights",
                 "--data", str(SHARED / "qvhighlights" / "highlight_val_release.jsonl"), "--out", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]["qvhighlights"]
    assert round(100 * m["MR-mAP"], 2) == 32.2 and round(100 * m["HL-HIT@1"], 2) == 55.55
    assert "| qvhighlights |" in (out / "results.md").read_text()
