"""Reward functions: plain Python callables named `package.module:function`, called
TRL-style with prompts, completions, completion_ids and the dataset's other columns."""

from __future__ import annotations

import importlib
import re
import types
from typing import Any, Callable

import numpy as np

from rayalign.config import ConfigError
from rayalign.rewards.base import RewardSource, ScoreError, SourceContext, as_scores

# The documented form: a dotted module path, a colon, a dotted attribute path. A reward-model
# dir whose name looks like this must be written as a path (./name).
FUNCTION_SPEC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


# Callables handed to the Python API (`train_online_dpo({"reward_funcs": [fn]})`) that cannot be
# imported by name (lambdas, closures, __main__ functions) live here for the process's runs: the
# config names them like any other function, rayalign.rewards.function:CALLABLES.<name>. Reward
# functions run in the driver, so this process is the one that calls them.
CALLABLES = types.SimpleNamespace()


def function_spec(fn: Callable) -> str:
    """The `module:function` spec of a Python callable: its own import path when that path
    leads back to it, else a name registered in CALLABLES."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname:
        spec = f"{module}:{qualname}"
        try:
            if load_function(spec, "reward_funcs") is fn:
                return spec
        except ConfigError:
            pass
    name = f"fn{len(vars(CALLABLES))}_" + re.sub(r"\W", "_", getattr(fn, "__name__", "reward"))
    setattr(CALLABLES, name, fn)
    return f"{__name__}:CALLABLES.{name}"


def load_function(spec: str, field: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field}: {spec!r} is not module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import module {module_name!r} ({exc})") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"{field}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{field}: {spec!r} is not callable")
    return fn


class FunctionSource(RewardSource):
    kind = "function"

    def __init__(self, spec: str, index: int, ctx: SourceContext):
        super().__init__(spec, index, ctx)
        self.fn = load_function(spec, f"reward_funcs[{index}]")

    @classmethod
    def matches(cls, spec: str) -> bool:
        return FUNCTION_SPEC.fullmatch(spec) is not None

    @classmethod
    def check(cls, spec: str, field: str, *, trust_remote_code: bool = False) -> None:
        load_function(spec, field)

    @classmethod
    def probe(cls, spec: str, field: str, prompts: list, completions: list, completion_ids: list[list[int]],
              columns: dict[str, list]) -> None:
        """Raising, the wrong count, values that are not numbers, or nothing but NaN / None
        fails here, naming the function, instead of after the actors have loaded."""
        label = f"{field} ({spec})"
        fn = load_function(spec, field)
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as exc:
            raise ConfigError(f"{label}: raised {type(exc).__name__}: {exc} when probed with {len(prompts)} "
                              "completions of train_dataset prompts (the prompt's text and \"\")") from exc
        try:
            scores, given = as_scores(values, len(prompts), label)
        except ScoreError as exc:
            raise ConfigError(f"{exc} (probed with {len(prompts)} completions of train_dataset prompts)") from None
        if not np.isfinite(scores[given]).any():
            raise ConfigError(f"{label}: returned no finite score for any of {len(prompts)} probe completions "
                              f"of train_dataset prompts (got {list(values)[:4]}): it cannot rank samples")

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2]

    def submit(self, prompts: list, completions: list, completion_ids: list[list[int]],
               columns: dict[str, list]) -> Callable[[], Any]:
        return lambda: self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
