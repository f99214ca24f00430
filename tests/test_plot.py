"""posttrain.plot: PNGs per metric group from a two-stage (SFT then GRPO) run, tolerant of a crashed writer; panels
per loss scale and stage kind, x ranges limited to the stages that log a metric, elapsed time in units, and one
evaluation curve across stages."""

import argparse
import json
import warnings

import pytest

from posttrain.errors import UserError
from posttrain.plot import (STAGE_BOUNDARY, add_plot_arguments, group_keys, load_metrics, metric_panels, plot_run,
                            run_figures, run_plot, stage_segments)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0  # the wall clock tracking.py writes as `time`
PASS = "eval/bench/pass@1"


def _sft_time(step):
    return T0 + 0.5 * step


def _grpo_time(step):
    return T0 + 60 + 3.0 * step  # 30 s of SFT, a 30 s stage switch, 3 s per RL step


def _write_metrics(run_dir, truncated=False, evals_in_metrics=True, eval_file=False):
    """As the pipeline writes them: stage `sft` (steps 1..60, eval/loss every 20; loss 2/step) then `grpo`
    (steps 1..40, restarting at 1; loss ~1e-9 as RL surrogates are), a wall-clock `time` on every line, and
    the benchmark evaluation `eval/bench/pass@1` before training (sft step 0), every 30 steps and at each
    stage end, on lines of its own (`evals_in_metrics`) and/or as eval.jsonl rows (`eval_file`: the
    checkpoints only, as pipeline.py writes it)."""
    lines, evals = [], []

    def evaluate(stage, step, time, value):
        if evals_in_metrics:
            lines.append(json.dumps({"stage": stage, "step": step, "time": time + 0.1, PASS: value}))
        if eval_file and step in (0, 60 if stage == "sft" else 40):
            evals.append(json.dumps({"model": stage if step else "initial", "stage": stage, "step": step,
                                     "accuracy": value, "n": 10, "metrics": {"bench": {"pass@1": value}}}))

    evaluate("sft", 0, T0 - 1, 0.1)
    for step in range(1, 61):
        rec = {"stage": "sft", "step": step, "time": _sft_time(step), "loss": 2.0 / step, "lr": 1e-3,
               "grad_norm": 1.0 + step % 3, "time/step_s": 0.1}
        if step % 20 == 0:
            rec["eval/loss"] = 1.0 / step
        lines.append(json.dumps(rec))
        if step % 30 == 0:
            evaluate("sft", step, _sft_time(step), 0.1 + step / 200)
    for step in range(1, 41):
        lines.append(json.dumps({"stage": "grpo", "step": step, "time": _grpo_time(step),
                                 "loss": 1e-9 * (step % 5 - 2), "lr": 1e-5, "grad_norm": None,
                                 "reward/mean": step / 40, "reward/std": 0.1, "accuracy": None if step % 2 else 0.5,
                                 "note": "text is skipped", "done": True}))
        if step % 20 == 0:
            evaluate("grpo", step, _grpo_time(step), 0.4 + step / 400)
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"stage": "grpo", "step": 41, "lo'
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)
    if evals:
        (run_dir / "eval.jsonl").write_text("\n".join(evals) + "\n")


def _axes(run_dir, group):
    """{panel title: Axes} of one figure of the run."""
    fig = dict(run_figures(run_dir))[group]
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def _data_lines(ax):
    """The lines that draw data (not the dashed stage boundaries)."""
    return [line for line in ax.get_lines() if line.get_gid() != STAGE_BOUNDARY]


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
    # sft starts at 0: the evaluation before training is logged at step 0
    assert [(s["name"], s["start"], s["end"]) for s in segments] == [("sft", 0, 60), ("grpo", 61, 100)]


def test_already_global_steps_are_not_shifted():
    records = [{"stage": "a", "step": s} for s in (1, 2, 3)] + [{"stage": "b", "step": s} for s in (4, 5)]
    assert [(s["start"], s["end"]) for s in stage_segments(records)] == [(1, 3), (4, 5)]


def test_grouping_by_prefix():
    groups = group_keys(["reward/std", "kl", "loss", "eval/loss", "grad_norm", "reward/mean", "lr", "time/gen_s",
                         "tokens_per_s", "verifier/exact/timeouts", "time/elapsed"])
    assert list(groups)[:3] == ["loss", "lr", "grad_norm"]
    assert groups["reward"] == ["reward/mean", "reward/std"]
    assert groups["time"] == ["time/elapsed", "time/gen_s", "tokens_per_s"]  # elapsed first
    assert groups["verifier"] == ["verifier/exact/timeouts"]  # a count, not a time
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


def test_sft_and_grpo_losses_get_their_own_panels_fitting_each(tmp_path):
    _write_metrics(tmp_path / "run")
    axes = _axes(tmp_path / "run", "loss")
    assert set(axes) == {"loss · sft", "loss · grpo"}
    sft_line, grpo_line = _data_lines(axes["loss · sft"])[-1], _data_lines(axes["loss · grpo"])[-1]  # the EMAs
    sft_lo, sft_hi = axes["loss · sft"].get_ylim()
    grpo_lo, grpo_hi = axes["loss · grpo"].get_ylim()
    assert sft_hi > 1.9 and sft_hi - sft_lo < 10  # SFT's loss (2 .. 0.03) fills its axis
    assert grpo_lo <= -2e-9 and 2e-9 <= grpo_hi and grpo_hi - grpo_lo < 1e-8  # ±2e-9 fills its own, not flat
    assert min(grpo_line.get_xdata()) == 61 and max(sft_line.get_xdata()) == 60
    assert axes["loss · grpo"].get_xlim()[0] > 59  # the RL panel starts where RL does


def test_panels_split_losses_by_stage_kind_and_any_metric_by_scale():
    def seg(name, offset, values):
        return {"name": name, "offset": offset, "records": [{"step": i + 1, "m": v, "loss": v}
                                                            for i, v in enumerate(values)]}

    segments = [seg("sft", 0, [2.0, 1.0, 0.5]), seg("sft2", 3, [0.6, 0.4, 0.3]), seg("rl", 6, [0.2, -0.1, 0.3])]
    # same scale, no kinds known: one panel over the three stages
    assert [p["segments"] for p in metric_panels(segments, "loss")] == [[0, 1, 2]]
    # the recipe says the third stage is GRPO: a different objective, its own loss panel (other metrics shared)
    kinds = {"sft": "sft", "sft2": "sft", "rl": "grpo"}
    assert [(p["segments"], p["title"]) for p in metric_panels(segments, "loss", kinds)] == [
        ([0, 1], "loss · sft, sft2"), ([2], "loss · rl")]
    assert [p["segments"] for p in metric_panels(segments, "m", kinds)] == [[0, 1, 2]]
    # a stage 1000× smaller gets its own panel whatever the key
    segments[1] = seg("sft2", 3, [6e-4, 4e-4, 3e-4])
    assert [p["segments"] for p in metric_panels(segments, "m")] == [[0, 2], [1]]
    # ... but a stage that is all zeros reads as a flat zero on any axis
    segments[1] = seg("sft2", 3, [0.0, 0.0, 0.0])
    assert [p["segments"] for p in metric_panels(segments, "m")] == [[0, 1, 2]]


def test_rl_only_panels_span_only_the_rl_steps(tmp_path):
    _write_metrics(tmp_path / "run")
    for group, title in (("reward", "reward/mean"), ("reward", "reward/std"), ("accuracy", "accuracy")):
        ax = _axes(tmp_path / "run", group)[title]
        lo, hi = ax.get_xlim()
        assert 59 < lo <= 61 and 100 <= hi < 102, (title, lo, hi)
        assert not [line for line in ax.get_lines() if line.get_gid() == STAGE_BOUNDARY]
    lr = _axes(tmp_path / "run", "lr")  # 1e-3 then 1e-5: one panel per scale, each over its own stage
    assert [tuple(round(x) for x in lr[t].get_xlim()) for t in ("lr · sft", "lr · grpo")] == [(-1, 61), (60, 101)]
    lo, hi = _axes(tmp_path / "run", "grad_norm")["grad_norm"].get_xlim()  # SFT only (null in GRPO)
    assert lo < 1 and hi < 62


def test_time_panel_is_elapsed_time_with_units_not_a_timestamp(tmp_path):
    _write_metrics(tmp_path / "run")
    axes = _axes(tmp_path / "run", "time")
    assert list(axes) == ["elapsed wall-clock time", "time/step_s"]
    elapsed = axes["elapsed wall-clock time"]
    assert elapsed.get_ylabel() == "elapsed (min)"
    (line,) = _data_lines(elapsed)
    ys = line.get_ydata()
    total = (_grpo_time(40) + 0.1) - (T0 - 1 + 0.1)  # from the evaluation before training to the last one
    assert min(ys) == 0 and max(ys) == pytest.approx(total / 60) and max(elapsed.get_ylim()) < 10
    assert min(line.get_xdata()) == 0 and max(line.get_xdata()) == 100  # one curve across both stages
    assert axes["time/step_s"].get_ylabel() == "step_s (s)"
    assert "time" not in {ax.get_title() for group, fig in run_figures(tmp_path / "run") for ax in fig.axes}


def _eval_curve(run_dir):
    ax = _axes(run_dir, "eval")[PASS]
    (line,) = _data_lines(ax)  # one connected Line2D, not one per stage
    assert [other.get_gid() for other in ax.get_lines() if other is not line] == [STAGE_BOUNDARY]
    return list(line.get_xdata()), list(line.get_ydata())


def test_eval_is_one_curve_across_stages(tmp_path):
    _write_metrics(tmp_path / "run")
    xs, ys = _eval_curve(tmp_path / "run")
    assert xs == [0, 30, 60, 80, 100]  # sft steps 0, 30, 60; grpo steps 20, 40 after sft's 60
    assert ys == pytest.approx([0.1, 0.25, 0.4, 0.45, 0.5])
    (loss_line,) = _data_lines(_axes(tmp_path / "run", "eval")["eval/loss"])  # SFT's validation loss: SFT only
    assert list(loss_line.get_xdata()) == [20, 40, 60]


def test_eval_curve_comes_from_eval_jsonl_when_metrics_lack_it(tmp_path):
    _write_metrics(tmp_path / "run", evals_in_metrics=False, eval_file=True)
    xs, ys = _eval_curve(tmp_path / "run")
    assert xs == [0, 60, 100] and ys == pytest.approx([0.1, 0.4, 0.5])
    _write_metrics(tmp_path / "both", evals_in_metrics=True, eval_file=True)
    assert _eval_curve(tmp_path / "both")[0] == [0, 30, 60, 80, 100]  # eval.jsonl rows are not drawn twice


def test_stage_kinds_from_the_resolved_recipe_split_the_loss(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        if rec["stage"] == "grpo" and "loss" in rec:
            rec["loss"] = 0.5 + 0.01 * rec["step"]  # on SFT's scale: only the kind tells them apart
    (run / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    assert set(_axes(run, "loss")) == {"loss"}
    (run / "recipe.resolved.yaml").write_text("name: x\nstages:\n  sft:\n    args: {}\n  grpo:\n    kind: grpo\n")
    assert set(_axes(run, "loss")) == {"loss · sft", "loss · grpo"}
