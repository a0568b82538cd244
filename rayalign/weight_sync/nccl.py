"""The `nccl` weight-sync channel: learner rank 0 broadcasts the policy to every rollout engine.

GPU learners and GPU rollout actors: once after the actors start, a broadcast group of its
own is set up: learner rank 0 is its rank 0 and publishes host:port (as
`ActorGroup.init_distributed` does), then come the receiving processes of every engine in
actor order (`RolloutEngine.receiving_ranks`: a vLLM engine's tensor_parallel_size
workers, one per HF actor): world size 1 + their sum. Per push the driver takes the
tensors' names, dtypes and shapes from the learner through Ray, hands them to every
engine, then runs the learner's broadcast and the engines' receive together and waits on
all of them at most `rollout.weight_sync_timeout_s`: whoever has not answered is named in
a `WeightSyncError`.

The wire is the engine's (`RolloutEngine.group_kind`): a torch process group (NCCL, or
gloo for CPU tests) carrying the buckets `plan_buckets` describes, which the HF engine
receives (rayalign/engines/hf.py); or an engine's own transfer API (vLLM's, see
rayalign/engines/vllm.py, which owns both of its ends). Both ends fingerprint the tensors
they sent / received (`weights.Fingerprint`); `WeightChannel.push` compares those and the
probe log-probs as on the object-store path.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta

import ray
import torch

from rayalign.models.weights import Fingerprint
from rayalign.weight_sync.base import WeightChannel, WeightExport, WeightSyncError

BUCKET_BYTES = 256 << 20  # one broadcast carries about this much (fewer, larger collectives)
TORCH_GROUP_KINDS = ("nccl", "gloo")


def group_kind(cfg, backend: str) -> str:
    """How the group talks for the (resolved) rollout backend: the engine's own wire, or a
    torch group: `nccl` on GPU learners, `gloo` on CPU ones (tests)."""
    from rayalign.engines import engine_class

    return engine_class(backend).group_kind(cfg.learner.num_gpus_per_actor > 0)


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
            raise ValueError(f"weight-sync group kind {kind!r}: expected one of {TORCH_GROUP_KINDS}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([tensor], options).wait(self.timeout)


class TorchSender:
    """Learner rank 0's end of a torch group (rank 0)."""

    def __init__(self, kind: str, host: str, port: int, world_size: int, timeout_s: float):
        self.group = TorchGroup(kind, host, port, 0, world_size, timeout_s)
        self.device = self.group.device

    def send(self, state: dict[str, torch.Tensor]) -> None:
        """Broadcast `state` in `describe(state)` order (the receivers hold that list)."""
        tensors = list(state.values())
        for bucket in plan_buckets(describe(state)):
            self.group.broadcast(pack([tensors[i].to(self.device) for i in bucket]))
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()


class Sender:
    """Learner rank 0's end of the group, on the wire `kind` (`group_kind`): a torch
    group, or the wire of the engine of that name."""

    def __init__(self, kind: str, host: str, port: int, world_size: int, timeout_s: float):
        if kind in TORCH_GROUP_KINDS:
            self.wire = TorchSender(kind, host, port, world_size, timeout_s)
        else:
            from rayalign.engines import engine_class

            self.wire = engine_class(kind).open_sender(host, port, world_size, timeout_s)

    def send(self, state: dict[str, torch.Tensor]) -> None:
        self.wire.send(state)


def sent_fingerprint(state: dict[str, torch.Tensor]) -> dict[str, float]:
    fp = Fingerprint()
    for t in state.values():
        fp.add(t)
    return fp.result()


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


class NcclChannel(WeightChannel):
    """`rollout.weight_sync: nccl`: opens the broadcast group when built, then per push
    sends the metadata through Ray and broadcasts while every engine receives."""

    def __init__(self, cfg, learners, rollouts, info_vocab: int, log_dir: str | None = None):
        super().__init__(cfg, learners, rollouts, info_vocab, log_dir)
        self._open_group()

    def _open_group(self) -> None:
        """Once: learner rank 0 publishes host:port and becomes rank 0 of a broadcast group;
        every engine's receiving processes follow in actor order."""
        from rayalign.engines import engine_class

        timeout = self.cfg.rollout.weight_sync_timeout_s
        backend = self.rollouts.call("ready", timeout=timeout)[0]["backend"]
        kind = group_kind(self.cfg, backend)
        ranks = engine_class(backend).receiving_ranks(self.cfg.rollout)
        world = 1 + ranks * len(self.rollouts)
        host, port = ray.get(self.learners.actors[0].node_address.remote(), timeout=timeout)
        calls = [("learner 0", self.learners.actors[0].open_weight_sync.remote(host, port, world, kind, timeout))]
        calls += [(f"rollout {i}", a.open_weight_sync.remote(host, port, world, 1 + i * ranks, kind, timeout))
                  for i, a in enumerate(self.rollouts.actors)]
        wait_all(calls, timeout, f"opening the {kind} weight-sync group ({world} ranks)")

    def _transfer(self, version: int) -> tuple[WeightExport, list, float]:
        """Names, dtypes and shapes go through Ray first; then learner rank 0 broadcasts
        while every engine receives, all waited on with rollout.weight_sync_timeout_s."""
        t = time.time()
        export = self.learners.call("prepare_weights", self.probe, timeout=self.cfg.learner.collective_timeout_s)[0]
        t_export = time.time() - t
        calls = [("learner 0", self.learners.actors[0].broadcast_weights.remote())]
        calls += [(f"rollout {i}", a.receive_weights.remote(export.meta, version, self.probe))
                  for i, a in enumerate(self.rollouts.actors)]
        results = wait_all(calls, self.cfg.rollout.weight_sync_timeout_s, f"pushing weight version {version}")
        return export, results[1:], t_export
