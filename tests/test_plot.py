"""posttrain.plot: PNGs per metric group from a two-stage metrics.jsonl, tolerant of a crashed writer."""

import argparse
import json
import warnings

import pytest

from posttrain.errors import UserError
from posttrain.plot import add_plot_arguments, group_keys, load_metrics, plot_run, run_plot, stage_segments

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, truncated=False):
    """Stage `sft` (steps 1..60, eval every 20) then `grpo` (steps 1..40, restarting at 1)."""
    lines = []
    for step in range(1, 61):
        rec = {"stage": "sft", "step": step, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 1.0 + step % 3,
               "time/step_s": 0.1}
        if step % 20 == 0:
            rec["eval/loss"] = 1.0 / step
        lines.append(json.dumps(rec))
    for step in range(1, 41):
        lines.append(json.dumps({"stage": "grpo", "step": step, "loss": 0.01 * step, "lr": 1e-5, "grad_norm": None,
                                 "reward/mean": step / 40, "reward/std": 0.1, "accuracy": None if step % 2 else 0.5,
                                 "note": "text is skipped", "done": True}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"stage": "grpo", "step": 41, "lo'
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)


def test_plot_run_writes_valid_pngs_per_group(tmp_path):
    _write_metrics(tmp_path / "run")
    paths = plot_run(tmp_path / "run")
    names = [p.name for p in paths]
    assert names[:3] == ["loss.png", "lr.png", "grad_norm.png"]
    assert set(names) == {"loss.png", "lr.png", "grad_norm.png", "eval.png", "reward.png", "accuracy.png",
                          "time.png"}
    for path in paths:
        assert path.parent == tmp_path / "run" / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_out_dir_is_honoured(tmp_path):
    _write_metrics(tmp_path / "run")
    paths = plot_run(tmp_path / "run", out_dir=tmp_path / "elsewhere")
    assert paths and all(p.parent == tmp_path / "elsewhere" and p.is_file() for p in paths)


def test_truncated_last_line_is_skipped_with_one_warning(tmp_path):
    _write_metrics(tmp_path / "run", truncated=True)
    with pytest.warns(UserWarning, match="skipped 1 unparsable line") as caught:
        paths = plot_run(tmp_path / "run")
    assert len([w for w in caught if "unparsable" in str(w.message)]) == 1
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_missing_metrics_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl") as info:
        plot_run(tmp_path)
    assert isinstance(info.value, UserError)  # the CLI prints it as one line
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "nope")


def test_stages_are_concatenated_on_a_global_step_axis(tmp_path):
    _write_metrics(tmp_path / "run")
    segments = stage_segments(load_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert [(s["name"], s["start"], s["end"]) for s in segments] == [("sft", 1, 60), ("grpo", 61, 100)]


def test_already_global_steps_are_not_shifted():
    records = [{"stage": "a", "step": s} for s in (1, 2, 3)] + [{"stage": "b", "step": s} for s in (4, 5)]
    assert [(s["start"], s["end"]) for s in stage_segments(records)] == [(1, 3), (4, 5)]


def test_grouping_by_prefix():
    groups = group_keys(["reward/std", "kl", "loss", "eval/loss", "grad_norm", "reward/mean", "lr", "time/gen_s",
                         "tokens_per_s"])
    assert list(groups)[:3] == ["loss", "lr", "grad_norm"]
    assert groups["reward"] == ["reward/mean", "reward/std"]
    assert groups["time"] == ["time/gen_s", "tokens_per_s"]
    assert list(groups)[-1] == "time"


def test_empty_file_writes_nothing(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_run(tmp_path) == []
    ns = argparse.Namespace(run_dir=str(tmp_path), out=None)
    assert run_plot(ns) == 1


def test_cli_arguments_and_run_plot_print_paths(tmp_path, capsys):
    _write_metrics(tmp_path / "run")
    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    ns = parser.parse_args([str(tmp_path / "run"), "--out", str(tmp_path / "png")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_plot(ns) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "png" / "loss.png") in printed and len(printed) == 7


def test_ema_is_bias_corrected():
    from posttrain.plot import ema

    assert ema([3.0, 3.0, 3.0], span=9) == pytest.approx([3.0, 3.0, 3.0])
    # α = 0.5: [1, (0.5·0.5·1 + 0.5·3)/(0.75)] = [1, 2.333…] — not dragged toward the first value
    assert ema([1.0, 3.0], span=3) == pytest.approx([1.0, 7 / 3])
