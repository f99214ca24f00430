"""The quickstart arithmetic task generator: correct answers, determinism, disjoint splits, files."""

import json

import pytest

from posttrain.tasks import arithmetic
from posttrain.tasks.arithmetic import evaluate, make_rows, make_splits


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_match_python_eval():
    rows = make_rows(2000, seed=3)
    for row in rows:
        assert row["prompt"].endswith("=")
        expected = str(eval(row["prompt"][:-1]))  # digits and + - * only, checked below
        assert set(row["prompt"][:-1]) <= set("0123456789+-*")
        assert row["completion"] == row["answer"] == expected


def test_value_ranges_follow_defaults():
    for row in make_rows(3000, seed=1):
        expr = row["prompt"][:-1]
        numbers = [int(x) for x in expr.replace("*", "+").replace("-", "+").split("+")]
        assert 2 <= len(numbers) <= 3
        assert all(0 <= x <= arithmetic.MAX_OPERAND for x in numbers)
        assert expr.count("*") <= arithmetic.MAX_MUL
        for term in expr.replace("-", "+").split("+"):
            if "*" in term:
                assert all(0 <= int(f) <= arithmetic.MAX_FACTOR for f in term.split("*"))
        assert not any(len(x) > 1 and x.startswith("0") for x in expr.replace("*", "+").replace("-", "+").split("+"))


def test_evaluate_precedence_and_negatives():
    assert evaluate("12+7*3=") == 33
    assert evaluate("3-4*5") == -17
    assert evaluate("20-3-4=") == 13
    assert evaluate("2*3*4=") == 24
    with pytest.raises(ValueError):
        evaluate("1+=")


def test_same_seed_same_rows_other_seed_other_rows():
    assert make_rows(500, seed=7) == make_rows(500, seed=7)
    assert make_rows(500, seed=7) != make_rows(500, seed=8)


def test_rows_are_unique_and_too_small_space_is_an_error():
    prompts = [r["prompt"] for r in make_rows(5000, seed=0)]
    assert len(set(prompts)) == len(prompts)
    with pytest.raises(ValueError, match="distinct"):
        make_rows(200, seed=0, max_operand=3, max_factor=3, max_operands=2)  # only 4*4*3 = 48 exist


def test_unknown_setting_is_rejected():
    with pytest.raises(TypeError, match="max_operand"):
        make_rows(10, seed=0, max_operandz=5)


def test_options_restrict_the_expressions():
    rows = make_rows(300, seed=0, ops="+-", max_operand=9, min_operands=3, max_operands=3)
    for row in rows:
        expr = row["prompt"][:-1]
        assert "*" not in expr and len(expr) == 5


def test_make_splits_writes_disjoint_deterministic_files(tmp_path):
    paths = make_splits(tmp_path / "a", n_train=1000, n_test=100, seed=5)
    train, test = _read_jsonl(paths["train"]), _read_jsonl(paths["test"])
    assert len(train) == 1000 and len(test) == 100
    for row in train + test:
        assert set(row) >= {"prompt", "completion", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    corpus = paths["corpus"].read_text().splitlines()
    assert corpus == [r["prompt"] + r["completion"] for r in train]
    readme = paths["readme"].read_text()
    assert "python -m posttrain.tasks.arithmetic" in readme and "prompt" in readme and "completion" in readme
    again = make_splits(tmp_path / "b", n_train=1000, n_test=100, seed=5)
    for name in ("train", "test", "corpus"):
        assert again[name].read_bytes() == paths[name].read_bytes()


def test_cli_writes_the_splits(tmp_path, capsys):
    out = tmp_path / "quick"
    assert arithmetic.main(["--out", str(out), "--n-train", "50", "--n-test", "10", "--seed", "2"]) == 0
    assert len(_read_jsonl(out / "train.jsonl")) == 50
    assert len(_read_jsonl(out / "test.jsonl")) == 10
    assert str(out / "train.jsonl") in capsys.readouterr().out


def test_cli_reports_an_impossible_request(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--n-train", "100", "--n-test", "10", "--max-operand", "2", "--max-factor", "2",
            "--max-operands", "2"]
    assert arithmetic.main(argv) == 2
    assert "error:" in capsys.readouterr().err
