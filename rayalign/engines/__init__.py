"""Rollout engines: one module per generation backend, picked by name from `ENGINES`.

To add a backend: write `rayalign/engines/<name>.py` with a `RolloutEngine` subclass
(rayalign/engines/base.py says what it must do) and add it to `ENGINES`. `Rollout` actors,
`resolve_backend` and the weight-sync channels only go through this dict and the class's
methods. (A backend users select in YAML is also listed in `RolloutConfig.backend`.)
"""

from __future__ import annotations

from rayalign.engines.base import Completion, GenerateResult, LoadResult, RolloutEngine
from rayalign.engines.hf import HFEngine
from rayalign.engines.vllm import VLLMEngine

ENGINES: dict[str, type[RolloutEngine]] = {"hf": HFEngine, "vllm": VLLMEngine}
AUTO_ORDER = ("vllm", "hf")  # `backend: auto` takes the first of these that is available


def engine_class(name: str) -> type[RolloutEngine]:
    """The engine registered as `name` (an already resolved backend)."""
    if name not in ENGINES:
        raise ValueError(f"rollout backend {name!r}: expected one of {sorted(ENGINES)}")
    return ENGINES[name]


def resolve_backend(name: str, field: str = "rollout.backend") -> str:
    """`auto` -> the first available of AUTO_ORDER (vllm when importable, else hf); a
    backend that cannot run here is a clear error."""
    if name == "auto":
        return next(n for n in AUTO_ORDER if ENGINES[n].available())
    if not engine_class(name).available():
        from rayalign.config import ConfigError

        raise ConfigError(f"{field}: {name} is not installed{ENGINES[name].install_hint}; use backend: hf or auto")
    return name


__all__ = ["AUTO_ORDER", "Completion", "ENGINES", "GenerateResult", "LoadResult", "RolloutEngine", "engine_class",
           "resolve_backend"]
