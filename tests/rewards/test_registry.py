"""What a reward spec names is decided once, by `SOURCES`: `module:function` exactly is a
Python function, anything else a reward model; adding a kind is one module plus one entry
in SOURCES (a constant source registered here scores next to a function)."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest

from rayalign import rewards
from rayalign.config import ConfigError, ScoringConfig
from rayalign.rewards import (RewardSources, check_reward_sources, probe_reward_functions, source_class,
                              source_cpus)
from rayalign.rewards.base import RewardSource, SourceContext
from rayalign.rewards.function import FunctionSource
from rayalign.rewards.model import RewardModelSource


@pytest.mark.parametrize("spec, kind", [
    ("a:b", FunctionSource), ("rayalign.demo.task:demo_reward", FunctionSource), ("pkg.mod:Cls.method", FunctionSource),
    ("./no/such/reward-model", RewardModelSource), ("org/reward-model", RewardModelSource),
    ("s3://bucket/rm", RewardModelSource), ("/models/rm:v2", RewardModelSource), ("mod:", RewardModelSource),
    (":fn", RewardModelSource), ("mod:fn-1", RewardModelSource),
])
def test_a_spec_is_a_function_iff_it_is_module_colon_function(spec, kind):
    assert source_class(spec) is kind


def test_sources_say_what_ray_must_give_them():
    scoring = ScoringConfig(num_cpus_per_actor=1.5)
    assert source_cpus(["a:b", "./rm", "c:d", "org/rm"], scoring) == 3.0


class ConstantSource(RewardSource):
    """`const:<number>`: the same score for every completion."""

    kind = "constant"
    PATTERN = re.compile(r"const:(.*)")

    def __init__(self, spec: str, index: int, ctx: SourceContext):
        super().__init__(spec, index, ctx)
        self.value = float(self.PATTERN.fullmatch(spec).group(1))

    @classmethod
    def matches(cls, spec: str) -> bool:
        return cls.PATTERN.fullmatch(spec) is not None

    @classmethod
    def check(cls, spec: str, field: str, *, trust_remote_code: bool = False) -> None:
        try:
            float(cls.PATTERN.fullmatch(spec).group(1))
        except ValueError:
            raise ConfigError(f"{field}: {spec!r} is not const:<number>") from None

    @property
    def name(self) -> str:
        return "const"

    def submit(self, prompts: list, completions: list, completion_ids: list[list[int]],
               columns: dict[str, list]) -> Callable[[], Any]:
        return lambda: [self.value] * len(completions)


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture
def with_constant(monkeypatch):
    monkeypatch.setattr(rewards, "SOURCES", (ConstantSource, *rewards.SOURCES))  # the registry entry


def test_a_registered_source_is_checked_probed_and_scored(with_constant):
    specs = ["const:2.5", f"{__name__}:length_reward"]
    check_reward_sources(specs)
    with pytest.raises(ConfigError, match=r"reward_funcs\[0\]: 'const:x' is not const:<number>"):
        check_reward_sources(["const:x"])
    probe_reward_functions(specs, [{"prompt": "p", "prompt_ids": [1, 2]}])
    sources = RewardSources(specs, [2.0, 1.0], ScoringConfig(), max_length=64)
    total, means = sources.score(["p", "p"], ["ab", "abcd"], [[1], [1]], [True, False], missing_eos_penalty=1.0)
    np.testing.assert_allclose(total, [2 * 2.5 + 2, 2 * 2.5 + 4 - 1.0])
    assert means["rewards/const/mean"] == 2.5 and means["rewards/length_reward/mean"] == 3.0
    assert source_cpus(specs, ScoringConfig()) == 0.0
