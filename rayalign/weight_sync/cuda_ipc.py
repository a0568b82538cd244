"""The `cuda_ipc` weight-sync channel: learner and vLLM engine on the same GPU share memory.

For colocated runs (a learner and its rollout engine on fractional shares of one GPU, the
common one-GPU online-DPO setup): NCCL refuses two ranks on one device, and the object store
would copy the weights through host memory every step. Here learner rank 0 packs the tensors
it would push (`plan_buckets`: vLLM's packing rule, about `BUCKET_BYTES` per bucket) into one
uint8 GPU buffer per bucket and exports each buffer once as a CUDA IPC handle
(`torch.multiprocessing.reductions.reduce_tensor`); the driver hands the handles to every
engine, which maps them (no copy across the PCIe bus) and loads them through vLLM's
weight-transfer API (`WeightTransferConfig(backend="ipc")`, packed mode; see
rayalign/engines/vllm.py). The buffers are released once every engine answered. The checks
are `WeightChannel.push`'s: versions, fingerprints of what the learner packed against what
the engines' loaders received, probe log-probs.

While the learner trains, a colocated engine sleeps (`rollout.sleep_between_steps`): vLLM's
sleep level 2 drops its KV cache and weights, so the learner has the GPU's memory for the
step; the push wakes the weights first (`wake_up(["weights"])`), loads the new ones into
them, then wakes the KV cache.

CUDA only: the handles name a physical GPU by its UUID, so an engine on another GPU (or
another node) cannot map them; `resolve_weight_sync` picks this channel only for engines that
share the learner's GPU.
"""

from __future__ import annotations

import time

import torch

from rayalign.weight_sync.base import WeightChannel, WeightExport, WeightSyncError
from rayalign.weight_sync.nccl import BUCKET_BYTES, describe, nbytes, pack, plan_buckets


def gpu_uuid(index: int | None = None) -> str:
    """The physical GPU's UUID (what an IPC handle is keyed by; vLLM's receiver looks it up)."""
    index = torch.cuda.current_device() if index is None else index
    return str(torch.cuda.get_device_properties(index).uuid)


def bucket_infos(state: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES,
                 share=None) -> tuple[list[torch.Tensor], list[dict]]:
    """Pack `state` into buffers of about `bucket_bytes` and describe each as the
    `update_info` of vLLM's packed IPC receiver (names, dtype_names, shapes, tensor_sizes,
    ipc_handles). `share(buffer) -> ipc_handles` exports a buffer (default: CUDA IPC keyed by
    this GPU's UUID). Returns the buffers (kept alive until the engines loaded them) and the
    infos."""
    if share is None:
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = gpu_uuid()

        def share(buffer):
            return {uuid: reduce_tensor(buffer)[1]}

    meta = describe(state)
    tensors = list(state.values())
    buffers, infos = [], []
    for bucket in plan_buckets(meta, bucket_bytes):
        buffer = pack([tensors[i] for i in bucket])
        buffers.append(buffer)
        infos.append({"names": [meta[i]["name"] for i in bucket],
                      "dtype_names": [meta[i]["dtype"] for i in bucket],
                      "shapes": [meta[i]["shape"] for i in bucket],
                      "tensor_sizes": [nbytes(meta[i]) for i in bucket],
                      "ipc_handles": share(buffer)})
    if torch.cuda.is_available() and buffers and buffers[0].is_cuda:
        torch.cuda.current_stream().synchronize()  # the engines read the buffers from another process
    return buffers, infos


class CudaIpcChannel(WeightChannel):
    def __init__(self, cfg, learners, rollouts, info_vocab: int, log_dir: str | None = None):
        super().__init__(cfg, learners, rollouts, info_vocab, log_dir)
        timeout = cfg.rollout.weight_sync_timeout_s
        learner_gpu = learners.call("gpu_uuid", timeout=timeout)[0]
        for rank, gpu in enumerate(rollouts.call("gpu_uuid", timeout=timeout)):
            if learner_gpu is None or gpu != learner_gpu:
                raise WeightSyncError(f"rollout {rank}: weight_sync=cuda_ipc needs it on learner rank 0's GPU "
                                      f"({learner_gpu}), but Ray placed it on {gpu}: run on a one-GPU node or use "
                                      "weight_sync=nccl with whole GPUs")
        rollouts.call("open_ipc_receiver", timeout=timeout)
        self.sleeps = cfg.rollout.sleep_between_steps is not False

    def before_train(self) -> None:
        """The engines give the GPU's memory back while the learner trains."""
        if self.sleeps:
            self.rollouts.call("sleep", timeout=self.cfg.rollout.weight_sync_timeout_s)

    def _transfer(self, version: int) -> tuple[WeightExport, list, float]:
        rcfg = self.cfg.rollout
        t = time.time()
        export = self.learners.call("export_ipc", self.probe, BUCKET_BYTES,
                                    timeout=self.cfg.learner.collective_timeout_s)[0]
        t_export = time.time() - t
        try:
            refs = [a.receive_ipc.remote(export.meta, version, self.probe) for a in self.rollouts.actors]
            try:
                loaded = self.rollouts.get(refs, rcfg.weight_sync_timeout_s)
            except TimeoutError as exc:
                raise WeightSyncError(f"rollout: loading weight version {version} over CUDA IPC did not finish "
                                      f"within rollout.weight_sync_timeout_s={rcfg.weight_sync_timeout_s}s") from exc
        finally:
            self.learners.call("release_ipc", timeout=self.cfg.learner.collective_timeout_s)
        return export, loaded, t_export
