"""Pairwise judges: for each prompt and pair (a, b), 0 (a is better), 1 (b is better) or -1
(a tie / no usable answer).

`RewardModelJudge` compares a reward model's scores; `LLMJudge` asks a causal LM (served by
a rollout actor) with a prompt template and parses its answer with `parse_judgment`.
`judge_pairs` swaps the positions of a random half of the pairs before asking and swaps the
answers back, cancelling position bias. `JUDGES` maps `judge.type` to the class; a new kind
is one class here (or its own module) with `start` and `judge`, plus one line in `JUDGES`.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import ray

from rayalign.config import JudgeConfig
from rayalign.rewards.base import ScoreError, as_scores
from rayalign.rewards.model import check_scorer_dir


class Judge(ABC):
    """One pairwise judge of a run, on an actor it started (`start`)."""

    @classmethod
    @abstractmethod
    def start(cls, cfg: JudgeConfig, *, max_length: int | None, trust_remote_code: bool,
              nonfinite: str) -> tuple[Judge, Any]:
        """Start the judge's actor; returns (judge, its actor group)."""

    @abstractmethod
    def judge(self, prompts: list, pairs: list[tuple[Any, Any]]) -> list[int]:
        """0, 1 or -1 (tie) for each pair, in order."""


_ANSWER_PATTERNS = [
    re.compile(r"^\s*\(?\s*([01])\s*\)?\s*(?:[.:,!](?!\d)|$|\s)"),  # "0", "1.", "(1)" leading (not "0.5")
    re.compile(r"\b(?:response|answer|output|completion)\s*#?\s*([01])\b", re.I),
    re.compile(r"^\s*\(?([AB])\)?\s*(?:[.:,!)](?!\w)|$|(?:is|wins)\b)"),  # "A", "(B).", "B is" (not "A tie")
    re.compile(r"\b(?:response|answer|output|completion)\s*\(?([AB])\)?(?!\w)", re.I),
    re.compile(r"\b(first|second)\b", re.I),
    re.compile(r"(?<![\d.])([01])(?![\d.])"),  # a lone 0 or 1 anywhere
]
_WORDS = {"0": 0, "1": 1, "a": 0, "b": 1, "first": 0, "second": 1}


def parse_judgment(text: str) -> int | None:
    """0 or 1 from a judge's free-form answer ("1", "Response 0 is better.", "(B)",
    "the second one"), or None when no single answer can be read."""
    if not isinstance(text, str):
        return None
    for pattern in _ANSWER_PATTERNS:
        found = {_WORDS[m.lower()] for m in pattern.findall(text)}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:  # "0 or 1", "first ... second": look at the earliest mention
            m = pattern.search(text)
            return _WORDS[m.group(1).lower()] if pattern is not _ANSWER_PATTERNS[-1] else None
    return None


class RewardModelJudge(Judge):
    """Prefers the completion a reward model scores higher (equal scores: a tie). A NaN or
    infinite score is no tie: `nonfinite="error"` raises naming `name`; `"penalize"` makes
    that side lose (both non-finite: a tie)."""

    def __init__(self, actor, name: str = "judge", nonfinite: str = "error"):
        self.actor = actor
        self.name = name
        self.nonfinite = nonfinite

    @classmethod
    def start(cls, cfg: JudgeConfig, *, max_length: int | None, trust_remote_code: bool,
              nonfinite: str) -> tuple[Judge, Any]:
        from rayalign.actors.group import ActorGroup, GroupSpec
        from rayalign.actors.reward import RewardModel, RewardModelConfig

        group = ActorGroup(RewardModel, GroupSpec("judge", 1, cfg.num_cpus, cfg.num_gpus),
                           args=(RewardModelConfig(cfg.model_name_or_path, batch_size=cfg.batch_size,
                                                   max_length=max_length, num_cpus=cfg.num_cpus,
                                                   num_gpus=cfg.num_gpus, trust_remote_code=trust_remote_code),))
        ray.get(group.actors[0].ready.remote())
        return cls(group.actors[0], f"judge ({cfg.model_name_or_path})", nonfinite), group

    def judge(self, prompts: list, pairs: list[tuple[Any, Any]]) -> list[int]:
        first = self.actor.score.remote(prompts, [a for a, _ in pairs])
        second = self.actor.score.remote(prompts, [b for _, b in pairs])
        s0, _ = as_scores(ray.get(first), len(pairs), self.name)
        s1, _ = as_scores(ray.get(second), len(pairs), self.name)
        ok0, ok1 = np.isfinite(s0), np.isfinite(s1)
        if self.nonfinite != "penalize" and not (ok0 & ok1).all():
            bad = np.flatnonzero(~(ok0 & ok1))
            raise ScoreError(f"{self.name}: non-finite scores for {len(bad)} of {len(pairs)} pairs (pairs "
                             f"{bad[:5].tolist()}); nonfinite_scores=error")
        s0, s1 = np.where(ok0, s0, -np.inf), np.where(ok1, s1, -np.inf)
        return [0 if a > b else 1 if b > a else -1 for a, b in zip(s0, s1)]


class LLMJudge(Judge):
    """Asks a causal LM (a rollout actor) which response is better; greedy, parsed robustly."""

    def __init__(self, actor, cfg: JudgeConfig, chat: bool):
        self.actor = actor
        self.cfg = cfg
        self.chat = chat
        self.last_raw: list[str] = []

    @classmethod
    def start(cls, cfg: JudgeConfig, *, max_length: int | None, trust_remote_code: bool,
              nonfinite: str) -> tuple[Judge, Any]:
        from rayalign.actors.group import ActorGroup, GroupSpec
        from rayalign.actors.rollout import Rollout, actor_env
        from rayalign.config import RolloutConfig
        from rayalign.engines import resolve_backend
        from rayalign.models.loading import load_tokenizer

        rcfg = RolloutConfig(backend=cfg.backend, num_actors=1, num_cpus_per_actor=cfg.num_cpus,
                             num_gpus_per_actor=cfg.num_gpus, hf_batch_size=cfg.batch_size)
        backend = resolve_backend(cfg.backend, "judge.backend")
        group = ActorGroup(Rollout, GroupSpec("judge", 1, cfg.num_cpus, cfg.num_gpus),
                           args=(cfg.model_name_or_path, rcfg, backend, None, max_length, trust_remote_code),
                           env_vars=actor_env(rcfg))
        ray.get(group.actors[0].ready.remote())
        chat = bool(getattr(load_tokenizer(cfg.model_name_or_path, trust_remote_code=trust_remote_code,
                                           field="judge.model_name_or_path"), "chat_template", None))
        return cls(group.actors[0], cfg, chat), group

    def render(self, prompt, a, b) -> Any:
        text = self.cfg.template.format(prompt=_as_text(prompt), response0=_as_text(a), response1=_as_text(b))
        return [{"role": "user", "content": text}] if self.chat else text

    def judge(self, prompts: list, pairs: list[tuple[Any, Any]]) -> list[int]:
        requests = [self.render(p, a, b) for p, (a, b) in zip(prompts, pairs)]
        sampling = {"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                    "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
                    "generation_kwargs": None, "n": 1}
        result = ray.get(self.actor.generate.remote(requests, sampling, 0))
        self.last_raw = [c[0]["text"] for c in result.completions]
        return [-1 if (v := parse_judgment(t)) is None else v for t in self.last_raw]


JUDGES: dict[str, type[Judge]] = {"reward_model": RewardModelJudge, "llm": LLMJudge}


def _as_text(value) -> str:
    if isinstance(value, (list, tuple)):  # messages
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def judge_pairs(judge: Judge, prompts: list, pairs: list[tuple[Any, Any]], *, shuffle_order: bool,
                rng: random.Random) -> list[int]:
    """The judge's answers in the caller's order, with a random half of the pairs shown swapped."""
    flips = [shuffle_order and rng.random() < 0.5 for _ in pairs]
    shown = [(b, a) if f else (a, b) for (a, b), f in zip(pairs, flips)]
    answers = judge.judge(prompts, shown)
    return [a if a < 0 or not f else 1 - a for a, f in zip(answers, flips)]


def check_judge_model(cfg: JudgeConfig, field: str = "judge", *, trust_remote_code: bool = False) -> None:
    check_scorer_dir(cfg.model_name_or_path, f"{field}.model_name_or_path", trust_remote_code=trust_remote_code)


def build_judge(cfg: JudgeConfig, *, max_length: int | None, trust_remote_code: bool = False,
                nonfinite: str = "error") -> tuple[Judge, Any]:
    """Start the judge `cfg.type` names; returns (judge, actor group)."""
    return JUDGES[cfg.type].start(cfg, max_length=max_length, trust_remote_code=trust_remote_code,
                                  nonfinite=nonfinite)
