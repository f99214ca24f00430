"""`posttrain eval`: a model on benchmarks, or a predictions file scored against a benchmark's annotations.

    posttrain eval MODEL --bench gsm8k,math500 [--n 16 --k 1,4,16] [--temperature 0.6 --top-p 0.95]
                   [--max-tokens 2048] [--engine hf|vllm] [--limit N] [--data NAME=PATH ...] [--out DIR]
    posttrain eval CKPT --bench charades_sta|activitynet|qvhighlights --data PATH --videos DIR [--limit N]
    posttrain eval --predictions preds.jsonl --bench charades_sta --data PATH [--out DIR]

MODEL is a hub id, a local HF directory, a run directory's checkpoint (`runs/x/grpo/final`), or a run directory
(its last finished stage's `final/`). Benchmarks are names of specs in `eval/` or paths of spec files.
`--videos DIR` is the folder holding the video files or the folder above it (`runner.find_video_dir`). A
predictions file is one JSON object per line (formats, errors and what is counted: `predictions.score_predictions`); a
grounding evaluation's samples.jsonl is one. What a result carries in `warnings` (e.g. a predictions file that
covers only some queries) is printed after the table, on stderr.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from posttrain.errors import UserError


def add_eval_arguments(p) -> None:
    p.add_argument("model", nargs="?", help="hub id, HF directory, run checkpoint or run directory")
    p.add_argument("--bench", required=True, help="comma-separated benchmark names (eval/*.yaml) or spec files")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default: the spec's)")
    p.add_argument("--k", default=None, help="comma-separated k for pass@k/maj@k/avg@k (default 1, powers of 2, n)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]PATH",
                   help="data file of a benchmark (needed for sets posttrain does not ship); NAME= may be left "
                        "out with one benchmark")
    p.add_argument("--videos", default=None, metavar="DIR",
                   help="video directory of the grounding benchmarks (files named by the annotations' video ids): "
                        "the folder holding the files, or the folder above it")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="score this file instead of a model (a grounding eval's samples.jsonl works too)")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<model>-<time>)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per generate call (hf engine)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--workers", type=int, default=2, help="verifier worker processes")


def default_ks(n: int) -> list[int]:
    """1, the powers of two below n, and n."""
    ks, k = [1], 2
    while k < n:
        ks.append(k)
        k *= 2
    return sorted(set(ks + [n]))


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. 1,4,16") from None


def data_paths(given: list[str], benches: list[str]) -> dict[str, str]:
    out = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep:
            if len(benches) != 1:
                raise UserError(f"--data {item}: with several benchmarks write --data NAME=PATH")
            name, path = benches[0], item
        if name not in benches:
            raise UserError(f"--data {item}: `{name}` is not among --bench {','.join(benches)}")
        out[name] = path
    return out


def overrides(ns) -> dict:
    """Spec overrides from the command line flags."""
    sampling = {k: v for k, v in {"n": ns.n, "temperature": ns.temperature, "top_p": ns.top_p, "top_k": ns.top_k,
                                  "max_tokens": ns.max_tokens, "seed": ns.seed}.items() if v is not None}
    out: dict = {"sampling": sampling} if sampling else {}
    if ns.n is not None or ns.k is not None:
        out["metrics"] = {"k": _int_list(ns.k, "--k") if ns.k else default_ks(ns.n or 1)}
    if ns.limit is not None:
        out["limit"] = ns.limit
    if getattr(ns, "videos", None):
        out["video"] = {"dir": ns.videos}
    return out


def load_specs(ns, benches: list[str]) -> list:
    from posttrain.recipe.benchmark import load_spec

    specs = []
    for bench in benches:
        spec = load_spec(bench, overrides(ns))
        if spec.sampling.n > 1 and spec.sampling.temperature == 0:
            spec = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"temperature": 0.6, "top_p": 0.95})})
            print(f"[posttrain] {spec.name}: n = {spec.sampling.n} samples need sampling: temperature 0.6, "
                  f"top_p 0.95 (set --temperature / --top-p to change)")
        specs.append(spec)
    return specs


def resolve_model(model: str) -> str:
    """A run directory means its last finished stage's final checkpoint."""
    path = Path(model)
    if (path / "recipe.resolved.yaml").is_file() and not (path / "config.json").is_file():
        import yaml

        stages = list(yaml.safe_load((path / "recipe.resolved.yaml").read_text())["stages"])
        finals = [path / s / "final" for s in stages if (path / s / "final" / "config.json").is_file()]
        if not finals:
            raise UserError(f"run directory `{model}` has no finished stage (no <stage>/final/)")
        print(f"[posttrain] evaluating {finals[-1]}")
        return str(finals[-1])
    return model


def make_eval_engine(kind: str, model_path: str, dtype: str, batch_size: int):
    import torch

    from posttrain.models import load_tokenizer
    from posttrain.rollout.base import make_engine

    cuda = torch.cuda.is_available()
    name = {"auto": "bfloat16" if cuda else "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    if kind != "hf":
        tokenizer = load_tokenizer(model_path)
        return make_engine(kind, model=None, tokenizer=tokenizer, path=model_path, dtype=name), tokenizer
    from posttrain.modeling import auto_model_class
    from posttrain.models import model_config

    config = model_config(model_path)
    try:
        model = auto_model_class(config).from_pretrained(model_path, config=config, dtype=getattr(torch, name))
    except OSError as err:
        raise UserError(f"cannot load a model from `{model_path}`: {err}") from None
    model = model.to("cuda" if cuda else "cpu").eval()
    tokenizer = load_tokenizer(model_path)
    return make_engine("hf", model=model, tokenizer=tokenizer, batch_size=batch_size), tokenizer


def _default_out(model: str) -> Path:
    name = re.sub(r"[^\w.-]+", "_", model.strip("/")).strip("_")[-60:] or "model"
    return Path("runs/eval") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_eval(ns) -> int:
    from transformers.utils import logging as hf_logging

    from posttrain.evaluation.report import markdown, metric_table, write_report

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars
    from posttrain.evaluation.predictions import score_predictions
    from posttrain.evaluation.runner import Evaluator

    benches = [b.strip() for b in ns.bench.split(",") if b.strip()]
    if not benches:
        raise UserError("--bench: name at least one benchmark")
    data = data_paths(ns.data, benches)
    specs = load_specs(ns, benches)
    started = time.perf_counter()
    if ns.predictions:
        if ns.model:
            raise UserError("give either a MODEL or --predictions, not both")
        results = {s.name: score_predictions(s, ns.predictions, data.get(s.name)) for s in specs}
        label, engine_name = ns.predictions, "predictions"
    else:
        if not ns.model:
            raise UserError("give a MODEL to evaluate (or --predictions FILE to score a predictions file)")
        label, engine_name = resolve_model(ns.model), ns.engine
        with Evaluator(specs, data, workers=ns.workers) as evaluator:  # data first: fail before loading the model
            engine, tokenizer = make_eval_engine(ns.engine, label, ns.dtype, ns.batch_size)
            results = evaluator.run(engine, tokenizer)
    out = Path(ns.out) if ns.out else _default_out(label)
    seed = specs[0].sampling.seed
    write_report(results, out, label, engine_name, seed, time.perf_counter() - started)
    print(markdown(metric_table(results)))
    for result in results.values():
        for warning in result.warnings:
            print(f"[posttrain] warning: {warning}", file=sys.stderr)
    print(f"\n[posttrain] wrote {out}/results.json, results.md, samples.jsonl, results.png "
          f"({time.perf_counter() - started:.1f} s)")
    return 0
