"""A CPU weight-transfer backend for vLLM's native weight-transfer API: `posttrain_gloo`.

vLLM 0.32 moves trainer weights into a running server through a pluggable weight-transfer engine: the trainer
calls the server's `/init_weight_transfer_engine` once, then per update `/start_weight_update`,
`/update_weights` (while it streams the tensors over its own data plane) and `/finish_weight_update`. vLLM's
built-in data planes (NCCL, CUDA IPC, RDMA) need CUDA. This backend is the same protocol over a torch gloo
group (TCP), so it runs between CPU processes and across machines:

* **Rendezvous**: the trainer's sender (trainer rank 0) is gloo rank 0 and hosts a `TCPStore` at
  `master_address:master_port`; the workers of every server join as ranks `rank_offset + worker rank`. The
  group is stateless (its own store, no `torch.distributed.init_process_group`), so it never touches the
  trainer's own DDP / DeepSpeed group or vLLM's.
* **Wire**: tensors travel in checkpoint format (HF names and shapes, as the model's `load_weights` reads
  them), one layer group at a time (`vllm ... base.layerwise_groups`), packed into flat buckets of one dtype
  of at most `BUCKET_BYTES`. Both sides derive the buckets from the same metadata, so only names, dtypes and
  shapes travel over HTTP. A layer group never straddles two buckets' gathers: under ZeRO-3 the trainer
  gathers one layer, sends it and frees it (`posttrain.rollout.server.LearnerSource`).
* **Load**: the worker side wraps the tensors in vLLM's layerwise reload (`initialize_layerwise_reload` at
  start, the model's own `load_weights` per bucket, `finalize_layerwise_reload` at finish), as vLLM's NCCL
  backend does, so fused layouts (q/k/v → qkv_proj) and CPU weight repacking are vLLM's own.

Registered with vLLM through the `vllm.general_plugins` entry point (`posttrain.rollout.vllm_plugin`), so a
`vllm serve` started with `--weight-transfer-config '{"backend": "posttrain_gloo"}'` finds it when posttrain is
installed in the server's environment. On GPUs use vLLM's own `nccl` backend (`weight_transfer: nccl`).

This module imports vLLM: only the vLLM server process and the `vllm_server` engine import it.
"""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import ClassVar, Iterator

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    layerwise_groups,
)

BACKEND = "posttrain_gloo"
BUCKET_BYTES = 64 << 20  # one gloo broadcast per bucket: few round trips, bounded extra memory


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What a server's workers need to join the transfer group (sent by the trainer's sender)."""

    master_address: str
    master_port: int
    rank_offset: int  # gloo rank of this server's first worker
    world_size: int  # trainer sender + every worker of every server
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One update round: the checkpoint-format parameters that follow, in order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: "
                             f"{len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)}")

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, getattr(torch, d), tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group of its own (rank 0 hosts the store). Returns (store, group): keep both alive."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=True)
    group = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("posttrain-weights", store),
                                               rank, world_size, timeout)
    return store, group


def buckets(meta: list[ParamMeta], limit: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices into `meta` per broadcast: within one layer group, consecutive parameters of one dtype, up to
    `limit` bytes (a bigger parameter goes alone). Pure function of the metadata: both sides agree."""
    position = {m.name: i for i, m in enumerate(meta)}
    out: list[list[int]] = []
    for group in layerwise_groups([m.name for m in meta]):
        current: list[int] = []
        size = 0
        for name in group:
            i = position[name]
            nbytes = meta[i].dtype.itemsize * _numel(meta[i].shape)
            if current and (meta[current[0]].dtype != meta[i].dtype or size + nbytes > limit):
                out.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            out.append(current)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------ inference side


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Worker side: receive buckets over gloo and load them through vLLM's layerwise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.store = self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.store, self.group = open_group(init_info.master_address, init_info.master_port, rank,
                                            init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # the base class also synchronises an accelerator, which a CPU worker does not have; gloo is synchronous
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("posttrain_gloo weight transfer is not initialised: call init_weight_transfer_engine first")
        meta = update_info.metadata()
        for bucket in buckets(meta):
            flat = torch.empty(sum(_numel(meta[i].shape) for i in bucket), dtype=meta[bucket[0]].dtype)
            self.group.broadcast(flat, 0).wait()
            self.model.load_weights(list(_unpack(flat, [meta[i] for i in bucket])))

    def shutdown(self) -> None:
        self.group = self.store = None


def _unpack(flat: torch.Tensor, metas: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for m in metas:
        n = _numel(m.shape)
        yield m.name, flat[offset : offset + n].view(m.shape)
        offset += n


# -------------------------------------------------------------------------------------- trainer side


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info: where the sender hosts the rendezvous and how many ranks join it."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 300.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side. Every trainer rank calls `send_weights` (a ZeRO-3 source gathers collectively); only the
    sender (rank 0) drives the servers and broadcasts."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("posttrain_gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.store = engine.group = None
        if not engine.is_sender:
            return engine
        worker_info = GlooInitInfo(init_info.master_address, init_info.master_port, 1, init_info.world_size,
                                   init_info.timeout_s)
        # the workers block in the rendezvous inside the HTTP call: run it beside our own join
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.store, engine.group = open_group(init_info.master_address, init_info.master_port, 0,
                                                    init_info.world_size, init_info.timeout_s)
            future.result()
        return engine

    def send_weights(self) -> None:
        source = self.source
        meta = source.metadata()
        if not self.is_sender:
            for _ in source.iter_groups():  # take part in the gathers only
                pass
            return
        update = GlooUpdateInfo([m.name for m in meta], [str(m.dtype).split(".")[-1] for m in meta],
                                [list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(self.client.update_weights, asdict(update))
            self._broadcast(source, meta)
            future.result()
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the workers never answer: do not wait for them
        self.client.finish_weight_update()

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        plan = buckets(meta)
        at = 0  # next bucket of the plan
        index = {m.name: i for i, m in enumerate(meta)}
        for names, tensors in source.iter_groups():
            given = dict(zip(names, tensors))
            while at < len(plan) and all(meta[i].name in given for i in plan[at]):
                parts = []
                for i in plan[at]:
                    tensor = given[meta[i].name]
                    if tensor.dtype != meta[i].dtype or tuple(tensor.shape) != meta[i].shape:
                        raise ValueError(f"weight source yielded {meta[i].name} as {tensor.dtype} "
                                         f"{tuple(tensor.shape)}, its metadata says {meta[i].dtype} {meta[i].shape}")
                    parts.append(tensor.detach().reshape(-1))
                flat = torch.cat(parts).cpu() if len(parts) > 1 else parts[0].cpu().contiguous()
                self.group.broadcast(flat, 0).wait()
                at += 1
            missing = [n for n in names if n not in index]
            if missing:
                raise ValueError(f"weight source yielded {missing[0]!r}, which its metadata does not list")
        if at != len(plan):
            raise ValueError(f"weight source ended after {at} of {len(plan)} buckets")

    def shutdown(self) -> None:
        self.group = self.store = None
