"""`posttrain` command line: validate | train | eval | score | new-model | plot.

Launch training on many processes with `accelerate launch -m posttrain train RECIPE k=v ...`.
Bad input exits with code 2 and one readable message (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys


def _validate(ns) -> int:
    import posttrain.stages  # noqa: F401  (registers the stage kinds the recipe is checked against)
    from posttrain.data import check_data_files
    from posttrain.recipe import check_batch_geometry, check_files, load_recipe
    from posttrain.reward import check_rewards

    resolved = load_recipe(ns.recipe, ns.overrides)
    check_files(resolved)
    check_data_files(resolved)
    check_rewards(resolved)
    processes = ns.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    check_batch_geometry(resolved, processes)
    stages = ", ".join(f"{s.name} ({s.kind})" for s in resolved.stages)
    print(f"{ns.recipe}: ok — {len(resolved.stages)} stage(s): {stages}; checked for {processes} process(es)")
    return 0


def _train(ns) -> int:
    from posttrain import pipeline  # imports posttrain.stages: the stage kinds are registered
    from posttrain.data import check_data_files
    from posttrain.recipe import check_files, load_recipe
    from posttrain.reward import check_rewards

    resolved = load_recipe(ns.recipe, ns.overrides)
    check_files(resolved)
    check_data_files(resolved)
    check_rewards(resolved)
    run_dir = ns.resume or ns.run_dir
    pipeline.run(resolved, run_dir=run_dir, resume=ns.resume is not None)
    return 0


def _new_model(ns) -> int:
    from posttrain.modeling import run_new_model

    return run_new_model(ns)


def _plot(ns) -> int:
    from posttrain.plot import run_plot

    return run_plot(ns)


def _eval(ns) -> int:
    from posttrain.evaluation.cli import run_eval

    return run_eval(ns)


def _score(ns) -> int:
    from posttrain.score import run_score

    return run_score(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe (schema, files, batch geometry) without loading a model")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--num-processes", type=int, default=None, help="processes to check batch geometry for")
    p.set_defaults(func=_validate)

    p = sub.add_parser("train", help="run a recipe's stages")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR")
    p.add_argument("--run-dir", metavar="DIR", default=None, help="where to write (default runs/<recipe name>)")
    p.set_defaults(func=_train)

    from posttrain.evaluation.cli import add_eval_arguments

    p = sub.add_parser("eval", help="evaluate a model on benchmarks (pass@k, maj@k, avg@k; grounding metrics)")
    add_eval_arguments(p)
    p.set_defaults(func=_eval)

    from posttrain.modeling import add_new_model_arguments

    p = sub.add_parser("new-model", help="write a random-init HF model and a byte-level BPE tokenizer")
    add_new_model_arguments(p)
    p.set_defaults(func=_new_model)

    from posttrain.score import add_score_arguments

    p = sub.add_parser("score", help="score a jsonl file of completions with a verifier (the training code path)")
    add_score_arguments(p)
    p.set_defaults(func=_score)

    from posttrain.plot import add_plot_arguments

    p = sub.add_parser("plot", help="PNG curves from a run's metrics.jsonl")
    add_plot_arguments(p)
    p.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from posttrain.errors import UserError, storage_error

    parser = build_parser()
    # Overrides may come after options (`train R --run-dir D k=v`): argparse leaves those unparsed.
    ns, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or not hasattr(ns, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.overrides = list(ns.overrides) + extra
    try:
        return ns.func(ns)
    except UserError as err:
        print(f"posttrain: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        message = storage_error(err)
        if message is None:
            raise
        print(f"posttrain: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
