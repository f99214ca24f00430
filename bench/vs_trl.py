"""Benchmark (not a test): one GRPO step of posttrain against TRL's `GRPOTrainer`, same model, data and settings.

Two random-init Qwen3-style models, both about 25M parameters, fp32, built here (no hub access):

* `quickstart-25M`: hidden 512, 8 layers, the quickstart's digit-level tokenizer and its vocabulary
  (260 tokens: the quickstart recipes' BPE cap of 300 is not reached on its corpus);
* `vocab-152k`: hidden 128, 8 layers, vocab_size 151,936 (Qwen's): three quarters of the parameters are the
  tied embedding, and every forward computes all 151,936 logits per token (the tokenizer is the small one: ids
  stay below the vocabulary; sampled ids above it decode to nothing). This row shows the memory and time the
  LM head costs each trainer.

The data are the quickstart prompts (`data/quickstart/train.jsonl`, made by `python -m posttrain.tasks.arithmetic`
when missing) with an exact-match reward on `answer` (posttrain: the built-in `exact` verifier; TRL: a reward
function doing the same whitespace-normalised comparison). Settings shared by both sides: 16 prompts × 8
samples per step, one optimizer step per rollout batch (128 rows, `--micro-batch` rows per forward), β = 0 (no
reference model), fp32, transformers `generate`, `--max-tokens` new tokens at temperature 1.0, lr 1e-6
constant, no warm-up, gradient checkpointing off, token-mean loss (TRL's default `loss_type="dapo"`,
posttrain's `loss_aggregation: token-mean`), one thread each (`--threads`). A third row runs TRL with
gradient checkpointing at TRL's own default (on).

Each run is a fresh subprocess (posttrain, TRL, TRL defaults, then the same again for every repeat, so load on
the machine hits all sides alike): `--warmup` untimed steps, then `--steps` timed ones. posttrain runs
`python -m posttrain train RECIPE --run-dir DIR` and its phases are read from `metrics.jsonl`
(`time/step`, `time/generate`, `time/score`, `time/logprobs`, `time/update`, `time/sync`); TRL runs a script
written here with `--python-trl` (a Python that imports trl: `pip install -e ".[bench]"`, or another venv), timed
by a `TrainerCallback` (on_step_begin → on_step_end: generation, scoring and the optimizer step, not logging),
with generation (`_generate_single_turn`) and scoring (`_calculate_rewards`) timed by wrapping them; TRL's
`update` column is the rest of the step (loss forward/backward, optimizer step, its bookkeeping). Peak RSS is
each child's own `getrusage(RUSAGE_SELF).ru_maxrss` at exit (the main process; posttrain's verifier workers are
separate small processes and not counted), and the CUDA peak when there is a GPU.

Known differences that settings cannot remove (both generate the step's 128 rows in one `generate` call):
posttrain's hf engine draws each token by inverse CDF (`posttrain.rollout.sampling`), TRL's `generate` by
`torch.multinomial` (the same distribution; the time this saves posttrain is part of what is measured); the
prompts each side draws differ (each shuffles with its own seed). Both score `exact` in the trainer's process. The random-init models never answer correctly, so every advantage is 0;
both trainers still run the full forward, backward and optimizer step.

    OMP_NUM_THREADS=1 python bench/vs_trl.py [--steps 5 --repeats 2 --sizes quickstart-25M,vocab-152k]
    python bench/vs_trl.py --python-trl /path/to/trl-venv/bin/python --out runs/bench-vs-trl/results.json

`--engine vllm` (GPU machines, untested here: no GPU was available when this was written) runs vLLM on both
sides: posttrain `engine: vllm` (colocated, sleeping during the update) and TRL `use_vllm=True,
vllm_mode="colocate"` with sleep mode on, both at `--vllm-gpu-memory` and the same max model length, and TRL's
`vllm_importance_sampling_correction=False` (posttrain applies none without `tis_cap`; TRL's default would add a
log-prob forward pass). The TRL child gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for its single process. TRL's
generate phase then includes its weight sync; posttrain reports sync separately. Both Pythons need vLLM.

Prints a table per size (median over all timed steps of all repeats; peak RSS: median over repeats) and a last
line with the ratios; writes every step's figures to `--out` as JSON. Figures depend on the machine; the README
quotes ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "quickstart"
SIZES = {
    "quickstart-25M": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536, vocab=None),
    "vocab-152k": dict(hidden=128, layers=8, heads=4, kv_heads=2, intermediate=1792, vocab=151936),
}
SIDES = ("posttrain", "trl", "trl-defaults")
LABELS = {"posttrain": "posttrain", "trl": "TRL (gc off)", "trl-defaults": "TRL defaults (gc on)"}
PHASES = ("generate", "score", "logprobs", "update", "sync")
PROMPTS, GROUP, PROMPT_LENGTH = 16, 8, 16

# The TRL side: run with `--python-trl`, one JSON argument (the settings), writes its results as JSON.
TRL_CHILD = r'''
import json, os, resource, sys, time
cfg = json.loads(open(sys.argv[1]).read())
import torch
from datasets import Dataset
from transformers import TrainerCallback
import trl
from trl import GRPOConfig, GRPOTrainer

rows = [json.loads(line) for line in open(cfg["data"])]
dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

def exact(completions, answer, **kwargs):
    norm = lambda s: " ".join(str(s).split())
    return [float(norm(c) == norm(a)) for c, a in zip(completions, answer)]

vllm = {}
if cfg["engine"] == "vllm":
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=cfg["vllm_gpu_memory"],
                vllm_enable_sleep_mode=True, vllm_max_model_length=cfg["max_model_len"],
                vllm_importance_sampling_correction=False)
args = GRPOConfig(
    output_dir=cfg["out_dir"], seed=cfg["seed"], max_steps=cfg["total_steps"],
    per_device_train_batch_size=cfg["micro_batch"], gradient_accumulation_steps=cfg["rows"] // cfg["micro_batch"],
    num_generations=cfg["group"], max_completion_length=cfg["max_tokens"], temperature=1.0, top_p=1.0, top_k=0,
    learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    beta=0.0, num_iterations=1, loss_type="dapo", bf16=False, fp16=False,
    gradient_checkpointing=cfg["gradient_checkpointing"], model_init_kwargs={"dtype": "float32"},
    save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, **vllm)

class StepTimer(TrainerCallback):
    def __init__(self):
        self.steps, self.current, self.began = [], {}, None
    def on_step_begin(self, args, state, control, **kwargs):
        self.current = {"generate": 0.0, "score": 0.0}
        self.began = time.perf_counter()
    def on_step_end(self, args, state, control, **kwargs):
        self.current["step"] = time.perf_counter() - self.began
        self.steps.append(self.current)

timer = StepTimer()
trainer = GRPOTrainer(model=cfg["model"], reward_funcs=exact, args=args, train_dataset=dataset, callbacks=[timer])

def timed(name, fn):
    def wrapper(*a, **k):
        began = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timer.current[name] = timer.current.get(name, 0.0) + time.perf_counter() - began
    return wrapper

trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
try:
    trainer.train()
finally:
    for s in timer.steps:
        s["update"] = s["step"] - s["generate"] - s["score"]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    out = {"steps": timer.steps, "completion_length": lengths,
           "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "versions": {"trl": trl.__version__, "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__}}
    open(cfg["result"], "w").write(json.dumps(out))
'''

# The posttrain side: `python -m posttrain ...` in this process, then the peak RSS into a JSON file.
POSTTRAIN_CHILD = r'''
import json, resource, runpy, sys
result = sys.argv[1]
sys.argv = ["posttrain"] + sys.argv[2:]
try:
    runpy.run_module("posttrain", run_name="__main__", alter_sys=True)
finally:
    import torch
    open(result, "w").write(json.dumps({
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))
'''


def build(out: Path, shape: dict) -> dict:
    """Random-init Qwen3 model (fp32) + the quickstart tokenizer in `out`; `vocab` widens the model's vocabulary."""
    from posttrain.modeling import build_config, build_model, build_tokenizer, count_parameters

    tokenizer = build_tokenizer([DATA / "corpus.txt"], vocab_size=300, model_max_length=512)
    config = build_config(tokenizer, arch="qwen3", max_position=512,
                          **{k: v for k, v in shape.items() if k != "vocab"})
    if shape["vocab"]:
        config.vocab_size = shape["vocab"]
    model = build_model(config, tokenizer, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"params": count_parameters(model), "vocab": config.vocab_size, "tokenizer": len(tokenizer)}


def posttrain_recipe(model: Path, ns, seed: int) -> dict:
    stage = {
        "engine": ns.engine,
        "data": {"path": str(DATA / "train.jsonl"), "template": "plain", "max_length": PROMPT_LENGTH},
        "rewards": [{"name": "exact"}],
        "args": {"steps": ns.warmup + ns.steps, "prompts_per_step": PROMPTS, "group_size": GROUP,
                 "micro_batch_size": ns.micro_batch, "temperature": 1.0, "max_tokens": ns.max_tokens, "lr": 1e-6,
                 "lr_schedule": "constant", "warmup_steps": 0, "save_every": 0, "eval_every": 0, "log_every": 1,
                 "kl_coef": 0.0, "loss_aggregation": "token-mean",
                 # TRL (transformers' Trainer) takes torch's fused AdamW by default with torch >= 2.8: the same here
                 "optimizer": "adamw_fused"},
    }
    if ns.engine == "vllm":
        stage["vllm"] = {"gpu_memory_utilization": ns.vllm_gpu_memory, "max_model_len": PROMPT_LENGTH + ns.max_tokens}
    return {"name": "vs-trl", "seed": seed, "precision": "fp32",
            "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": False},
            "tracking": {"progress": False}, "stages": {"grpo": stage}}


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[bool, float]:
    began = time.perf_counter()
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            out.write(f"\n[vs_trl] timed out after {timeout:.0f} s\n")
            ok = False
    return ok, time.perf_counter() - began


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_posttrain(model: Path, ns, seed: int, work: Path, env: dict) -> dict:
    work.mkdir(parents=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(posttrain_recipe(model, ns, seed), sort_keys=False))
    child, result, run = work / "child.py", work / "result.json", work / "run"
    child.write_text(POSTTRAIN_CHILD)
    ok, wall = _run([sys.executable, str(child), str(result), "train", str(recipe), "--run-dir", str(run)],
                    env, ns.timeout, work / "log.txt")
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    records = [r for r in records if r.get("stage") == "grpo" and "time/step" in r]
    steps = [{"step": r["time/step"], **{p: r.get(f"time/{p}", 0.0) for p in PHASES}} for r in records]
    out = json.loads(result.read_text()) if result.is_file() else {}
    return {"ok": ok, "wall_s": wall, "steps": steps[ns.warmup:],
            "completion_length": [r.get("completion_len/mean") for r in records][ns.warmup:],
            "peak_rss_kib": out.get("peak_rss_kib"), "cuda_peak_bytes": out.get("cuda_peak_bytes"),
            "log": str(work / "log.txt")}


def run_trl(model: Path, ns, seed: int, work: Path, env: dict, gradient_checkpointing: bool) -> dict:
    work.mkdir(parents=True)
    child, cfg_file, result = work / "child.py", work / "config.json", work / "result.json"
    child.write_text(TRL_CHILD)
    cfg = {"data": str(DATA / "train.jsonl"), "model": str(model), "out_dir": str(work / "out"), "seed": seed,
           "total_steps": ns.warmup + ns.steps, "micro_batch": ns.micro_batch, "rows": PROMPTS * GROUP,
           "group": GROUP, "max_tokens": ns.max_tokens, "lr": 1e-6, "gradient_checkpointing": gradient_checkpointing,
           "engine": ns.engine, "vllm_gpu_memory": ns.vllm_gpu_memory, "max_model_len": PROMPT_LENGTH + ns.max_tokens,
           "result": str(result)}
    cfg_file.write_text(json.dumps(cfg))
    if ns.engine == "vllm":  # TRL's colocated vLLM wants a (one-process) torch.distributed environment
        env = dict(env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    ok, wall = _run([ns.python_trl, str(child), str(cfg_file)], env, ns.timeout, work / "log.txt")
    out = json.loads(result.read_text()) if result.is_file() else {}
    ok = ok and len(out.get("steps", [])) == ns.warmup + ns.steps
    return {"ok": ok, "wall_s": wall, "steps": out.get("steps", [])[ns.warmup:],
            "completion_length": out.get("completion_length", [])[ns.warmup:], "peak_rss_kib": out.get("peak_rss_kib"),
            "cuda_peak_bytes": out.get("cuda_peak_bytes"), "versions": out.get("versions"),
            "log": str(work / "log.txt")}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> dict:
    steps = [s for r in runs if r["ok"] for s in r["steps"]]
    keys = ("step",) + PHASES
    row = {k: _median([s.get(k) for s in steps]) for k in keys}
    row["completion_len"] = _median([x for r in runs if r["ok"] for x in r["completion_length"]])
    # sampled tokens per second of the generate phase (TRL's includes its vLLM weight sync, see above)
    row["tokens_per_s"] = (PROMPTS * GROUP * row["completion_len"] / row["generate"]
                           if row["completion_len"] and row["generate"] else None)
    row["timed_steps"] = len(steps)
    row["failed_runs"] = sum(not r["ok"] for r in runs)
    rss = _median([r["peak_rss_kib"] for r in runs if r["ok"]])
    row["peak_rss_gib"] = rss / 2**20 if rss is not None else None
    cuda = _median([r["cuda_peak_bytes"] for r in runs if r["ok"]])
    row["cuda_peak_gib"] = cuda / 2**30 if cuda is not None else None
    return row


def _cell(value, fmt: str, width: int) -> str:
    return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def trl_python(arg: str | None) -> str:
    if arg:
        return arg
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("vs_trl: this Python cannot import trl. Install the bench extra (`pip install -e \".[bench]\"`, "
                         "TRL >= 1.16) or pass --python-trl PATH, the python of a venv that has trl installed")
    return sys.executable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-trl", default=None, help="a python that imports trl (default: this one, if it does)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="fresh runs of each side, interleaved")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from: {', '.join(SIZES)}")
    parser.add_argument("--max-tokens", type=int, default=64, help="max completion length (tokens)")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per forward pass, both sides")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--vllm-gpu-memory", type=float, default=0.3, help="vLLM gpu_memory_utilization, both sides")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a child is killed")
    parser.add_argument("--out", default="runs/bench-vs-trl/results.json")
    parser.add_argument("--keep", action="store_true", help="keep the models and run directories (printed)")
    ns = parser.parse_args()
    sizes = [s.strip() for s in ns.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {', '.join(unknown)} (valid: {', '.join(SIZES)})")
    if (PROMPTS * GROUP) % ns.micro_batch:
        parser.error(f"--micro-batch {ns.micro_batch} must divide the {PROMPTS * GROUP} rows of a step")
    ns.python_trl = trl_python(ns.python_trl)
    probe = subprocess.run([ns.python_trl, "-c", "import trl, transformers, torch; "
                            "print(trl.__version__, transformers.__version__, torch.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        raise SystemExit(f"vs_trl: {ns.python_trl} cannot import trl:\n{probe.stderr.strip()[-2000:]}")
    trl_versions = dict(zip(("trl", "transformers", "torch"), probe.stdout.split()))
    import torch
    import transformers

    ours = {"torch": torch.__version__, "transformers": transformers.__version__}
    if not (DATA / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "posttrain.tasks.arithmetic", "--out", str(DATA)], cwd=REPO, check=True)

    env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads), MKL_NUM_THREADS=str(ns.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models, runs, summary = {}, {}, None

    def write(total: float | None = None) -> None:  # after every run: a killed benchmark keeps what it measured
        out.write_text(json.dumps({
            "complete": summary is not None,
            "settings": dict(vars(ns), prompts_per_step=PROMPTS, group_size=GROUP, cpu_count=os.cpu_count()),
            "versions": {"posttrain_side": ours, "trl_side": trl_versions},
            "models": {s: m[1] for s, m in models.items()}, "summary": summary,
            "runs": {s: {side: [{k: v for k, v in r.items() if k != "log"} for r in rs] for side, rs in sides.items()}
                     for s, sides in runs.items()},
            "total_s": total}, indent=1))

    # SIGTERM as an exception: subprocess.run then kills the running child and the temp dir is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"vs_trl: terminated; runs so far in {out}"))
    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    began = time.perf_counter()
    try:
        for size in sizes:
            models[size] = (tmp / size, build(tmp / size, SIZES[size]))
            print(f"[vs_trl] built {size}: {models[size][1]['params']:,} parameters, vocab {models[size][1]['vocab']:,}",
                  flush=True)
        runs = {size: {side: [] for side in SIDES} for size in sizes}
        for repeat in range(ns.repeats):
            for size in sizes:
                path = models[size][0]
                for side in SIDES:
                    work = tmp / f"{size}-{side}-{repeat}"
                    if side == "posttrain":
                        r = run_posttrain(path, ns, repeat, work, env)
                    else:
                        r = run_trl(path, ns, repeat, work, env, gradient_checkpointing=side == "trl-defaults")
                    runs[size][side].append(r)
                    write()
                    med = _median([s["step"] for s in r["steps"]])
                    status = "ok" if r["ok"] else f"FAILED (log: {r['log']})"
                    print(f"[vs_trl] repeat {repeat + 1}/{ns.repeats} {size:<15} {LABELS[side]:<21} {status}, "
                          f"{r['wall_s']:.0f} s wall, median step {med if med is None else round(med, 2)} s", flush=True)
        summary = {size: {side: summarise(runs[size][side]) for side in SIDES} for size in sizes}
        total = time.perf_counter() - began
        write(total)
    finally:
        if ns.keep:
            print(f"[vs_trl] models and run directories kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    timed = f"median of {ns.repeats} run(s) × {ns.steps} timed steps (after {ns.warmup} warm-up)"
    print(f"\nGRPO step, {PROMPTS} prompts × {GROUP} samples, ≤{ns.max_tokens} new tokens, micro-batch {ns.micro_batch}, "
          f"fp32, engine {ns.engine}, OMP_NUM_THREADS={ns.threads}, {os.cpu_count()} CPUs; {timed}; seconds")
    print(f"posttrain side: torch {ours['torch']}, transformers {ours['transformers']}; "
          f"TRL side: trl {trl_versions['trl']}, torch {trl_versions['torch']}, "
          f"transformers {trl_versions['transformers']}")
    gpu = any(summary[s][side]["cuda_peak_gib"] is not None for s in sizes for side in SIDES)
    for size in sizes:
        info = models[size][1]
        print(f"\n{size}: {info['params']:,} parameters, vocab {info['vocab']:,}")
        print(f"{'':<22}{'step':>8}" + "".join(f"{p:>10}" for p in PHASES) + f"{'peak RSS GiB':>14}"
              + (f"{'CUDA GiB':>10}" if gpu else "") + f"{'tokens':>8}{'gen tok/s':>11}{'steps':>7}")
        for side in SIDES:
            r = summary[size][side]
            print(f"{LABELS[side]:<22}{_cell(r['step'], '.2f', 8)}" + "".join(_cell(r[p], '.2f', 10) for p in PHASES)
                  + _cell(r["peak_rss_gib"], ".2f", 14) + (_cell(r["cuda_peak_gib"], ".2f", 10) if gpu else "")
                  + _cell(r["completion_len"], ".1f", 8) + _cell(r["tokens_per_s"], ".0f", 11) + f"{r['timed_steps']:>7}" + (f"  ({r['failed_runs']} run(s) failed)" if r["failed_runs"] else ""))
    print("\n(TRL rows: `update` is the step less generate and score; logprobs and sync are not separable there; "
          "tokens: mean completion length; gen tok/s: sampled tokens per second of the generate phase)")
    print(f"wall time {total / 60:.1f} min; results in {out}")
    parts = []
    for size in sizes:
        p, t, d = (summary[size][side] for side in SIDES)
        parts.append(f"{size} step TRL/posttrain {_ratio(t['step'], p['step'])}, "
                     f"peak RSS posttrain/TRL {_ratio(p['peak_rss_gib'], t['peak_rss_gib'])} "
                     f"(TRL defaults: step {_ratio(d['step'], p['step'])}, "
                     f"RSS {_ratio(p['peak_rss_gib'], d['peak_rss_gib'])})")
    print("ratios: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
