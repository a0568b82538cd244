"""The reward-source interface: one way of scoring sampled completions.

A source kind is one module in `rayalign/rewards/` with a `RewardSource` subclass, listed
in `SOURCES` (rayalign/rewards/__init__.py), which decides from a config string which kind
it names (`matches`). Before Ray starts, `check` validates the spec (imports, model
files) and `probe` may call it on real prompts; in the run, `RewardSources` builds one
object per spec and asks each for scores (`submit`, so that sources on actors work
concurrently).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np


class ScoreError(ValueError):
    """Scores that cannot rank completions (wrong count, not numbers, NaN / inf); the
    message names the reward source."""


@dataclass(frozen=True)
class SourceContext:
    """What a source may need to start: the scoring actors' resources, the sequence cap
    and remote-code trust of the run, and an optional placement per source."""

    scoring_cfg: Any  # config.ScoringConfig
    max_length: int | None
    trust_remote_code: bool = False
    placement: Any = None


class RewardSource(ABC):
    """One reward source of a run, built from its spec (`reward_funcs[index]`)."""

    kind: ClassVar[str]

    def __init__(self, spec: str, index: int, ctx: SourceContext):
        self.spec = spec
        self.index = index

    @classmethod
    @abstractmethod
    def matches(cls, spec: str) -> bool:
        """Whether `spec` names a source of this kind (SOURCES asks in order)."""

    @classmethod
    @abstractmethod
    def check(cls, spec: str, field: str, *, trust_remote_code: bool = False) -> None:
        """Before any actor starts: raise a ConfigError naming `field` if `spec` cannot work."""

    @classmethod
    def probe(cls, spec: str, field: str, prompts: list, completions: list, completion_ids: list[list[int]],
              columns: dict[str, list]) -> None:
        """Before Ray starts: try the source on a few dummy completions (cheap sources only)."""

    @classmethod
    def num_cpus(cls, scoring_cfg) -> float:
        """CPUs the source's actors take from the local Ray."""
        return 0.0

    @property
    @abstractmethod
    def name(self) -> str:
        """The metric name: rewards/<name>/mean."""

    def starting(self) -> list:
        """Refs to wait on before the first score (actors loading their model)."""
        return []

    @abstractmethod
    def submit(self, prompts: list, completions: list, completion_ids: list[list[int]],
               columns: dict[str, list]) -> Callable[[], Any]:
        """Start scoring; the returned call gives one number (or None: does not apply) per
        completion."""

    def shutdown(self) -> None:
        """Stop the source's actors."""


def as_scores(values: Any, n: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """A reward source's return value as (float scores, mask of the ones given): one number
    or None (TRL: does not apply) per completion; anything else raises naming `label`."""
    try:
        count = len(values)
    except TypeError:
        raise ScoreError(f"{label}: returned {type(values).__name__}, not a list of {n} scores") from None
    if count != n:
        raise ScoreError(f"{label}: returned {count} values for {n} completions")
    out = np.full(n, math.nan)
    given = np.zeros(n, dtype=bool)
    for j, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, (str, bytes)):
            raise ScoreError(f"{label}: value {j} is {v!r}, not a number (return floats, or None where the "
                             "function does not apply)")
        try:
            out[j] = float(v)
        except (TypeError, ValueError):
            raise ScoreError(f"{label}: value {j} is {v!r} ({type(v).__name__}), not a number") from None
        given[j] = True
    return out, given
