"""Reward models: a saved sequence-classification model (a dir or hub id) scored by a
`RewardModel` actor (rayalign/actors/reward.py)."""

from __future__ import annotations

import os
from typing import Any, Callable

import ray

from rayalign.rewards.base import RewardSource, SourceContext


def check_scorer_dir(path: str, field: str, *, trust_remote_code: bool = False) -> None:
    """`check_model_dir` for a model that brings its own tokenizer (reward models, judges)."""
    from rayalign.config import is_adapter_dir
    from rayalign.models.loading import check_model_dir, load_tokenizer

    local = os.path.isdir(os.path.expanduser(path)) and not is_adapter_dir(path)
    check_model_dir(path, field, trust_remote_code=trust_remote_code)  # files first: clearer than a tokenizer error
    if local:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, field=field)
        check_model_dir(path, field, trust_remote_code=trust_remote_code, tokenizer=tokenizer, tokenizer_field=field)


class RewardModelSource(RewardSource):
    kind = "model"

    def __init__(self, spec: str, index: int, ctx: SourceContext):
        from rayalign.actors.group import ActorGroup, GroupSpec
        from rayalign.actors.reward import RewardModel, RewardModelConfig

        super().__init__(spec, index, ctx)
        scoring = ctx.scoring_cfg
        rm_cfg = RewardModelConfig(spec, batch_size=scoring.batch_size, max_length=ctx.max_length,
                                   num_cpus=scoring.num_cpus_per_actor, num_gpus=scoring.num_gpus_per_actor,
                                   trust_remote_code=ctx.trust_remote_code)
        self.group = ActorGroup(RewardModel, GroupSpec.of(f"reward-model{index}", scoring, 1, field="scoring"),
                                args=(rm_cfg,), placement=ctx.placement[index] if ctx.placement else None)
        self.actor = self.group.actors[0]

    @classmethod
    def matches(cls, spec: str) -> bool:
        return True  # anything no other kind claims is a model dir or hub id

    @classmethod
    def check(cls, spec: str, field: str, *, trust_remote_code: bool = False) -> None:
        """Files, safetensors headers, custom code, its own tokenizer against its embedding."""
        check_scorer_dir(spec, field, trust_remote_code=trust_remote_code)

    @classmethod
    def num_cpus(cls, scoring_cfg) -> float:
        return scoring_cfg.num_cpus_per_actor

    @property
    def name(self) -> str:
        return os.path.basename(self.spec.rstrip("/")) or self.spec

    def starting(self) -> list:
        return [self.actor.ready.remote()]

    def submit(self, prompts: list, completions: list, completion_ids: list[list[int]],
               columns: dict[str, list]) -> Callable[[], Any]:
        ref = self.actor.score.remote(prompts, completions)
        return lambda: ray.get(ref)

    def shutdown(self) -> None:
        self.group.shutdown()
