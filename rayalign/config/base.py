"""Config errors, field checks and the sections every job shares (Ray, learner,
reference, LoRA, logging)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value or combination; the message names the field."""


# Set while `collect_errors` runs: failed checks are appended here and validation goes on,
# so one invocation reports every bad field at once instead of one per try.
_ERRORS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("rayalign_config_errors", default=None)


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        report(f"{name}: {msg}")


def report(message: str) -> None:
    """A config error: raised, or recorded while `collect_errors` is active."""
    sink = _ERRORS.get()
    if sink is None:
        raise ConfigError(message)
    if message not in sink:
        sink.append(message)


@contextlib.contextmanager
def collect_errors():
    """Inside, failed checks are recorded instead of raised; on leaving, one ConfigError
    lists them all. An exception other than ConfigError after an error was recorded is taken
    as a consequence of that error (validation went on with a bad value) and dropped."""
    sink: list[str] = []
    token = _ERRORS.set(sink)
    try:
        yield sink
    except ConfigError as exc:
        report(str(exc))
    except Exception:
        if not sink:
            raise
    finally:
        _ERRORS.reset(token)
    if sink:  # the first error leads (callers match its field); the others follow, a line each
        raise ConfigError("\n  ".join(sink))


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


BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_resources(value: dict | None, name: str) -> None:
    """Custom Ray resources an actor group asks for on top of its CPUs/GPUs: names a node was
    started with (`ray start --resources='{"ref_node": 4}'`, KubeRay's rayStartParams), the
    way to put a role on chosen nodes."""
    if value is None:
        return
    for key, amount in value.items():
        _require(isinstance(key, str) and bool(key) and key not in BUILTIN_RESOURCES, f"{name}.{key}",
                 f"a custom resource name; CPUs and GPUs have their own fields ({', '.join(BUILTIN_RESOURCES)} "
                 "are Ray's)")
        _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0,
                 f"{name}.{key}", f"must be a number > 0, got {amount!r}")


def is_adapter_dir(path: str | None) -> bool:
    """A local PEFT adapter directory (it holds adapter_config.json)."""
    return bool(path) and Path(path).expanduser().joinpath("adapter_config.json").is_file()


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
    resources: dict[str, float] | None = None  # custom Ray resources per actor (pins the role to nodes)
    # Deal each micro-batch's rows across the learners by tokens (same rows, same micro-batch
    # slots) so no rank of a synchronous step waits on a longer one. Per-pair losses (DPO, reward)
    # give the same step; token-averaged ones (SFT, DPO's `sft` loss type) average each rank's
    # tokens, so their step depends on which rows a rank holds, dealt or split.
    balance_tokens: bool = True

    def __post_init__(self):
        _require(self.num_actors >= 1, "learner.num_actors", "must be >= 1")
        _one_of(self.zero_stage, "learner.zero_stage", [0, 1, 2, 3])
        _require(self.num_cpus_per_actor >= 0, "learner.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "learner.num_gpus_per_actor", "must be >= 0")
        _require(self.collective_timeout_s > 0, "learner.collective_timeout_s", "must be > 0")
        _check_resources(self.resources, "learner.resources")
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

    # null: TRL's choice — implicit for a LoRA policy (its adapter switched off), else actor
    mode: Literal["actor", "precompute", "implicit", "none"] | None = None
    model_name_or_path: str | None = None  # default: the policy's starting model
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 16  # rows per reference forward
    cache_dir: str | None = None  # precompute cache; default <output_dir>/../.ref_cache
    # precompute on a cache miss: "stream" scores blocks while the learners train on scored
    # ones (pays when the reference has devices of its own); "before_training" scores the
    # whole set first with every core of the node, then trains (TRL's order; faster where the
    # two would share the same CPUs); "auto": stream when the reference has GPUs or the
    # cluster has several nodes, else before_training.
    precompute_schedule: Literal["auto", "stream", "before_training"] = "auto"
    resources: dict[str, float] | None = None  # custom Ray resources per actor / precompute worker

    def __post_init__(self):
        _expand_paths(self, ("model_name_or_path", "cache_dir"))
        _one_of(self.mode, "reference.mode", (None, *REFERENCE_MODES))
        _require(self.num_actors >= 1, "reference.num_actors", "must be >= 1")
        _require(self.num_cpus_per_actor >= 0, "reference.num_cpus_per_actor", "must be >= 0")
        _require(self.num_gpus_per_actor >= 0, "reference.num_gpus_per_actor", "must be >= 0")
        _require(self.batch_size >= 1, "reference.batch_size", "must be >= 1")
        _one_of(self.precompute_schedule, "reference.precompute_schedule", ("auto", "stream", "before_training"))
        _check_resources(self.resources, "reference.resources")


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA on the policy; when enabled only the adapter is trained and saved. With a
    PEFT adapter dir as `model_name_or_path` (DPO) that adapter is trained and its own
    adapter_config.json replaces r / alpha / dropout / target_modules."""

    enabled: bool = False
    r: int = 16  # r / alpha / dropout: TRL ModelConfig's defaults
    alpha: int = 32
    dropout: float = 0.05
    # null: PEFT's default modules for the architecture (TRL's default); ["all-linear"]: every
    # linear layer but the output head
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        _require(self.r >= 1, "lora.r", "must be >= 1")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0 (the adapter is scaled by alpha / r), got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules",
                 "must not be empty (null: PEFT's default for the architecture)")


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
