"""Weight-sync channels: how the learner's weights reach the rollout engines after each step.

One module per channel, picked by `rollout.weight_sync` from `CHANNELS`:
`object_store` (rayalign/weight_sync/object_store.py: the state dict through Ray's object
store), `nccl` (rayalign/weight_sync/nccl.py: a broadcast group from learner rank 0 on
the engine's wire) and `cuda_ipc` (rayalign/weight_sync/cuda_ipc.py: an engine colocated on
the learner's GPU maps its buckets through CUDA IPC handles). `WeightChannel` (base.py) is the interface and does the checks and the
audit log every channel shares. To add a channel: a module with a `WeightChannel` subclass,
one line in `CHANNELS` (and the name in `RolloutConfig.weight_sync`). The receiving end of
each channel belongs to the engine (rayalign/engines/).
"""

from __future__ import annotations

from dataclasses import replace

from rayalign.weight_sync.base import WeightChannel, WeightExport, WeightSyncError
from rayalign.weight_sync.cuda_ipc import CudaIpcChannel
from rayalign.weight_sync.nccl import NcclChannel, Sender, describe, sent_fingerprint
from rayalign.weight_sync.object_store import ObjectStoreChannel

CHANNELS: dict[str, type[WeightChannel]] = {"object_store": ObjectStoreChannel, "nccl": NcclChannel,
                                            "cuda_ipc": CudaIpcChannel}


def resolve_weight_sync(cfg, backend: str) -> str:
    """`auto` -> nccl when learners and rollout actors hold whole GPUs and the rollout
    backend (already resolved) prefers it (vLLM); cuda_ipc when one learner and the vLLM
    engines hold fractions of a GPU (colocated); object_store otherwise."""
    from rayalign.engines import engine_class

    mode = cfg.rollout.weight_sync
    if mode != "auto":
        return mode
    rcfg = cfg.rollout
    gpus = cfg.learner.num_gpus_per_actor >= 1 and rcfg.num_gpus_per_actor >= 1
    whole = float(cfg.learner.num_gpus_per_actor).is_integer() and float(rcfg.num_gpus_per_actor).is_integer()
    fits = rcfg.num_gpus_per_actor >= rcfg.tensor_parallel_size  # one GPU per vLLM worker
    if gpus and whole and fits and engine_class(backend).prefers_nccl():
        return "nccl"
    shared = (0 < cfg.learner.num_gpus_per_actor < 1 and 0 < rcfg.num_gpus_per_actor < 1
              and cfg.learner.num_actors == 1 and rcfg.tensor_parallel_size == 1)
    return "cuda_ipc" if shared and engine_class(backend).receives_ipc() else "object_store"


def resolved_rollout_config(cfg, backend: str):
    """The rollout section with `weight_sync` resolved (the engines need to know at start)."""
    return replace(cfg.rollout, weight_sync=resolve_weight_sync(cfg, backend))


def build_channel(cfg, learners, rollouts, info_vocab: int, mode: str, log_dir: str | None = None) -> WeightChannel:
    """The channel `mode` (a resolved rollout.weight_sync) between these actor groups; the
    nccl one opens its broadcast group here."""
    return CHANNELS[mode](cfg, learners, rollouts, info_vocab, log_dir)


__all__ = ["CHANNELS", "CudaIpcChannel", "NcclChannel", "ObjectStoreChannel", "Sender", "WeightChannel", "WeightExport",
           "WeightSyncError", "build_channel", "describe", "resolve_weight_sync", "resolved_rollout_config",
           "sent_fingerprint"]
