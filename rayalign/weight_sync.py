"""The `nccl` weight-sync channel: learner rank 0 broadcasts the policy to every rollout engine.

`rollout.weight_sync=object_store` sends the state dict through Ray's object store
(`WeightSync` in drivers/online.py). `nccl` (GPU learners and GPU rollout actors) sets up,
once after the actors start, a broadcast group of its own: learner rank 0 is its rank 0
and publishes host:port (as `ActorGroup.init_distributed` does), then come the receiving
processes of every engine in actor order (a vLLM engine's tensor_parallel_size workers, one
per HF actor): world size 1 + their sum. Per push the driver takes the tensors' names,
dtypes and shapes from the learner through Ray, hands them to every engine, then runs the
learner's broadcast and the engines' receive together and waits on all of them at most
`rollout.weight_sync_timeout_s`: whoever has not answered is named in a `WeightSyncError`.

Receivers:
* vLLM (>= 0.32), through its weight-transfer API: the engine is built with
  `WeightTransferConfig(backend="nccl")`; `LLM.init_weight_transfer_engine` joins the group,
  then `start_weight_update` / `update_weights` / `finish_weight_update` receive packed
  buckets into fresh buffers and feed them to the model's `load_weights` inside vLLM's
  layerwise reload. The learner sends with the helpers vLLM's own trainer engine uses
  (`nccl_common.trainer_init`, `packed_nccl_broadcast_producer`) and the wire params it
  gave the workers at init.
* HF: a torch process group of its own (NCCL, or gloo for CPU tests), the same bucket
  plan, `load_state_dict`.

Both ends fingerprint the tensors they sent / received (`weights.Fingerprint`); the driver
compares those and the probe log-probs as on the object-store path.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import ray
import torch

from rayalign.actors.rollout import WeightSyncError, _refresh_tied_head
from rayalign.models.weights import Fingerprint, fingerprints_match

BUCKET_BYTES = 256 << 20  # one broadcast carries about this much (fewer, larger collectives)
NUM_BUFFERS = 2  # vLLM: buckets in flight on each side


# ----------------------------------------------------------------------------- config


def resolve_weight_sync(cfg, backend: str) -> str:
    """`auto` -> nccl when learners and rollout actors hold whole GPUs and the rollout
    backend (already resolved) is vLLM; object_store otherwise."""
    mode = cfg.rollout.weight_sync
    if mode != "auto":
        return mode
    rcfg = cfg.rollout
    gpus = cfg.learner.num_gpus_per_actor >= 1 and rcfg.num_gpus_per_actor >= 1
    whole = float(cfg.learner.num_gpus_per_actor).is_integer() and float(rcfg.num_gpus_per_actor).is_integer()
    fits = rcfg.num_gpus_per_actor >= rcfg.tensor_parallel_size  # one GPU per vLLM worker
    return "nccl" if gpus and whole and fits and backend == "vllm" else "object_store"


def resolved_rollout_config(cfg, backend: str):
    """The rollout section with `weight_sync` resolved (the engines need to know at start)."""
    return replace(cfg.rollout, weight_sync=resolve_weight_sync(cfg, backend))


def group_kind(cfg, backend: str) -> str:
    """How the group talks: `vllm` (vLLM's NCCL weight transfer), else a torch group:
    `nccl` on GPU learners, `gloo` on CPU ones (tests)."""
    if backend == "vllm":
        return "vllm"
    return "nccl" if cfg.learner.num_gpus_per_actor > 0 else "gloo"


def vllm_engine_kwargs(rcfg) -> dict[str, Any]:
    """Extra `vllm.LLM` arguments: the weight-transfer engine the nccl channel drives."""
    if rcfg.weight_sync != "nccl":
        return {}
    from vllm.config import WeightTransferConfig

    return {"weight_transfer_config": WeightTransferConfig(backend="nccl")}


# ----------------------------------------------------------------------------- metadata


def describe(state: dict[str, torch.Tensor]) -> list[dict]:
    """What a push sends, in order: name, dtype (torch's name, as vLLM's update info
    spells it) and shape of every tensor."""
    return [{"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in state.items()]


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"weight metadata names an unknown dtype {name!r}")
    return dtype


def nbytes(meta: dict) -> int:
    return math.prod(meta["shape"]) * dtype_of(meta["dtype"]).itemsize


def plan_buckets(meta: list[dict], bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices into `meta`, one list per broadcast: tensors in order until a bucket holds
    more than `bucket_bytes` (the tensor that crosses stays in it). This is vLLM's packing
    rule, so it also describes the buckets on the vLLM wire."""
    buckets, current, size = [], [], 0
    for i, m in enumerate(meta):
        current.append(i)
        size += nbytes(m)
        if size > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes back to back in one uint8 tensor (on their device)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, meta: list[dict]) -> list[torch.Tensor]:
    """Inverse of `pack` given each tensor's metadata (views into `buffer` where aligned)."""
    sizes = [nbytes(m) for m in meta]
    if sum(sizes) != buffer.numel():
        raise WeightSyncError(f"a bucket of {buffer.numel()} bytes does not hold {len(meta)} tensors "
                              f"of {sum(sizes)} bytes")
    out = []
    for part, m in zip(buffer.split(sizes), meta):
        dtype = dtype_of(m["dtype"])
        if part.storage_offset() % dtype.itemsize:  # after an odd-sized smaller dtype: realign
            part = part.clone()
        out.append(part.view(dtype).view(m["shape"]))
    return out


def vllm_init_info(host: str, port: int, world_size: int, rank_offset: int) -> dict:
    """`init_info` of `LLM.init_weight_transfer_engine` (vLLM's NCCLWeightTransferInitInfo):
    rendezvous plus the packing wire params the learner sends with."""
    return {"master_address": host, "master_port": port, "world_size": world_size, "rank_offset": rank_offset,
            "packed": True, "packed_buffer_size_bytes": BUCKET_BYTES, "packed_num_buffers": NUM_BUFFERS}


def vllm_update_info(meta: list[dict]) -> dict:
    """`update_info` of `LLM.update_weights` (vLLM's NCCLWeightTransferUpdateInfo)."""
    return {"names": [m["name"] for m in meta], "dtype_names": [m["dtype"] for m in meta],
            "shapes": [list(m["shape"]) for m in meta]}


# ----------------------------------------------------------------------------- the group


class TorchGroup:
    """A torch process group of its own over a TCPStore that rank 0 hosts (learner rank 0
    already belongs to the learners' default group, which the engines are not part of).
    Every collective waits at most `timeout_s`."""

    def __init__(self, kind: str, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        import torch.distributed as dist

        self.timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=self.timeout,
                                   wait_for_workers=False)
        store = dist.PrefixStore("rayalign-weight-sync", self.store)
        if kind == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif kind == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, self.timeout)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"weight-sync group kind {kind!r}: expected nccl or gloo")

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([tensor], options).wait(self.timeout)


class Sender:
    """Learner rank 0's end of the group (rank 0)."""

    def __init__(self, kind: str, host: str, port: int, world_size: int, timeout_s: float):
        self.kind = kind
        if kind == "vllm":
            from vllm.distributed.weight_transfer.nccl_common import trainer_init

            self.group = trainer_init({"master_address": host, "master_port": port, "world_size": world_size})
            self.device = self.group.device
        else:
            self.group = TorchGroup(kind, host, port, 0, world_size, timeout_s)
            self.device = self.group.device

    def send(self, state: dict[str, torch.Tensor]) -> None:
        """Broadcast `state` in `describe(state)` order (the receivers hold that list)."""
        if self.kind == "vllm":
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            torch.cuda.current_stream().synchronize()  # the producer packs on its own streams
            packed_nccl_broadcast_producer(iter(state.items()), self.group, src=0,
                                           post_iter_func=lambda item: item[1].to(self.device),
                                           buffer_size_bytes=BUCKET_BYTES, num_buffers=NUM_BUFFERS)
            return
        tensors = list(state.values())
        for bucket in plan_buckets(describe(state)):
            self.group.broadcast(pack([tensors[i].to(self.device) for i in bucket]))
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()


def sent_fingerprint(state: dict[str, torch.Tensor]) -> dict[str, float]:
    fp = Fingerprint()
    for t in state.values():
        fp.add(t)
    return fp.result()


# ----------------------------------------------------------------------------- receivers


def open_receiver(engine, kind: str, host: str, port: int, world_size: int, rank_offset: int,
                  timeout_s: float) -> TorchGroup | None:
    """Join the group from a rollout actor (ranks rank_offset..); blocks until all joined."""
    if kind == "vllm":
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        engine.llm.init_weight_transfer_engine(
            WeightTransferInitRequest(init_info=vllm_init_info(host, port, world_size, rank_offset)))
        return None
    return TorchGroup(kind, host, port, rank_offset, world_size, timeout_s)


def receive(engine, kind: str, group: TorchGroup | None, meta: list[dict], version: int) -> dict[str, float]:
    """Receive one push into `engine`; returns the fingerprint of the received tensors."""
    if kind == "vllm":
        return _vllm_receive(engine.llm, meta, version)
    fp = Fingerprint()
    state: dict[str, torch.Tensor] = {}
    for bucket in plan_buckets(meta):
        part = [meta[i] for i in bucket]
        buffer = torch.empty(sum(nbytes(m) for m in part), dtype=torch.uint8, device=group.device)
        group.broadcast(buffer)
        for m, tensor in zip(part, unpack(buffer, part)):
            fp.add(tensor)
            state[m["name"]] = tensor
    engine.load(state)
    return fp.result()


def _vllm_receive(llm, meta: list[dict], version: int) -> dict[str, float]:
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    llm.collective_rpc(_vllm_tap)
    llm.start_weight_update()
    llm.update_weights(WeightTransferUpdateRequest(update_info=vllm_update_info(meta)))
    llm.finish_weight_update(weight_version=str(version))
    fingerprints = llm.collective_rpc(_vllm_tapped)
    for worker, fp in enumerate(fingerprints[1:], start=1):
        if not fingerprints_match(fp, fingerprints[0]):
            raise WeightSyncError(f"vLLM worker {worker} received other tensors than worker 0: "
                                  f"{fp} != {fingerprints[0]}")
    return fingerprints[0]


def _vllm_tap(worker) -> None:
    """Runs in each vLLM worker: fingerprint what the weight-transfer engine hands to the
    model's `load_weights` (the received tensors) from now on. Wraps the bound method on
    the model instance once; vLLM's layerwise reload hooks the parameters' loaders below."""
    model = worker.model_runner.get_model()
    if "load_weights" not in vars(model):
        load = model.load_weights

        def load_weights(weights):
            weights = list(weights)
            for _, tensor in weights:
                model._rayalign_received.add(tensor)
            return load(weights)

        model.load_weights = load_weights
    model._rayalign_received = Fingerprint()


def _vllm_tapped(worker) -> dict[str, float]:
    """Runs in each vLLM worker after `finish_weight_update`."""
    model = worker.model_runner.get_model()
    _refresh_tied_head(model)
    return model._rayalign_received.result()


# ----------------------------------------------------------------------------- driver side


def wait_all(calls: list[tuple[str, ray.ObjectRef]], timeout_s: float, what: str) -> list:
    """Results of (label, ref) calls in order. The first call that fails, or every call
    still running after `timeout_s`, is named in a `WeightSyncError` (a peer stuck in a
    broadcast would otherwise hold the others forever); a dead actor is an `ActorFailure`."""
    from rayalign.actors.group import ActorFailure

    label = {ref: name for name, ref in calls}
    pending = [ref for _, ref in calls]
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            names = ", ".join(label[r] for r in pending)
            raise WeightSyncError(f"{what}: no answer from {names} within rollout.weight_sync_timeout_s="
                                  f"{timeout_s}s (a peer of the broadcast group is missing or stuck)")
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            raise ActorFailure(f"{label[ready[0]]} died during {what}: {str(exc).splitlines()[0]}") from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise WeightSyncError(f"{what}: {label[ready[0]]} failed: {type(cause).__name__}: "
                                  f"{str(cause).splitlines()[0] if str(cause) else ''}") from exc
    return ray.get([ref for _, ref in calls])
