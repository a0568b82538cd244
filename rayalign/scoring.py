"""Ranking sampled completions: reward functions, reward models, pairwise judges.

* `RewardSources`: weighted sum of plain Python reward functions (`module:function`,
  called TRL-style with prompts, completions, completion_ids and the dataset's other
  columns) and reward models (`RewardModel` actors); `missing_eos_penalty` is subtracted
  from completions that did not end with eos.
* Pairwise judges answer, for each prompt and pair (a, b), 0 (a is better), 1 (b is
  better) or -1 (a tie / no usable answer): `RewardModelJudge` compares a reward model's
  scores; `LLMJudge` asks a causal LM (served by a rollout actor) with a prompt template and
  parses its answer with `parse_judgment`. `judge_pairs` swaps the positions of a random
  half of the pairs before asking and swaps the answers back, cancelling position bias.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import re
from typing import Any, Callable, Sequence

import numpy as np
import ray

from rayalign.config import ConfigError, JudgeConfig


def is_function_spec(spec: str) -> bool:
    """`package.module:function` (not a path; Windows drive letters are not a concern here)."""
    return ":" in spec and not os.path.exists(spec) and "://" not in spec


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


def check_reward_sources(sources: Sequence[str], field: str = "reward_funcs") -> None:
    """Import every function and check every model path exists, before any actor starts."""
    from rayalign.models.loading import _check_exists

    for i, spec in enumerate(sources):
        name = f"{field}[{i}]"
        if is_function_spec(spec):
            load_function(spec, name)
        else:
            _check_exists(spec, name)


class RewardSources:
    """Weighted reward functions and reward-model actors; call `score` on the driver."""

    def __init__(self, sources: Sequence[str], weights: Sequence[float] | None, scoring_cfg,
                 max_length: int | None, trust_remote_code: bool = False, placement=None):
        from rayalign.actors.group import ActorGroup, GroupSpec
        from rayalign.actors.reward import RewardModel, RewardModelConfig

        self.names: list[str] = []
        self.functions: dict[int, Callable] = {}
        self.models: dict[int, Any] = {}
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(sources), dtype=np.float64)
        self._groups = []
        for i, spec in enumerate(sources):
            if is_function_spec(spec):
                self.functions[i] = load_function(spec, f"reward_funcs[{i}]")
                self.names.append(spec.rpartition(":")[2])
            else:
                rm_cfg = RewardModelConfig(spec, batch_size=scoring_cfg.batch_size, max_length=max_length,
                                           num_cpus=scoring_cfg.num_cpus_per_actor,
                                           num_gpus=scoring_cfg.num_gpus_per_actor,
                                           trust_remote_code=trust_remote_code)
                group = ActorGroup(RewardModel, GroupSpec(f"reward-model{i}", 1, scoring_cfg.num_cpus_per_actor,
                                                          scoring_cfg.num_gpus_per_actor),
                                   args=(rm_cfg,), placement=placement[i] if placement else None)
                self._groups.append(group)
                self.models[i] = group.actors[0]
                self.names.append(os.path.basename(spec.rstrip("/")) or spec)
        if self._groups:
            ray.get([g.actors[0].ready.remote() for g in self._groups])

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]], eos: list[bool],
              missing_eos_penalty: float | None = None, **columns) -> tuple[np.ndarray, dict[str, float]]:
        """Total score per completion, and each source's mean (TRL's rewards/<name>/mean)."""
        per_source = np.zeros((len(prompts), len(self.names)), dtype=np.float64)
        refs = {i: actor.score.remote(prompts, completions) for i, actor in self.models.items()}
        for i, fn in self.functions.items():
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            if len(values) != len(prompts):
                raise ValueError(f"reward_funcs[{i}] ({self.names[i]}): returned {len(values)} values for "
                                 f"{len(prompts)} completions")
            per_source[:, i] = [math.nan if v is None else float(v) for v in values]
        for i, ref in refs.items():
            per_source[:, i] = ray.get(ref)
        total = np.nansum(per_source * self.weights[None, :], axis=1)
        if missing_eos_penalty is not None:
            total = total - missing_eos_penalty * (~np.asarray(eos, dtype=bool))
        means = {f"rewards/{name}/mean": float(np.nanmean(per_source[:, i])) for i, name in enumerate(self.names)}
        return total, means

    def shutdown(self) -> None:
        for g in self._groups:
            g.shutdown()


# ----------------------------------------------------------------------------- judges

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


class RewardModelJudge:
    """Prefers the completion a reward model scores higher (equal scores: a tie)."""

    def __init__(self, actor):
        self.actor = actor

    def judge(self, prompts: list, pairs: list[tuple[Any, Any]]) -> list[int]:
        first = self.actor.score.remote(prompts, [a for a, _ in pairs])
        second = self.actor.score.remote(prompts, [b for _, b in pairs])
        out = []
        for s0, s1 in zip(ray.get(first), ray.get(second)):
            out.append(0 if s0 > s1 else 1 if s1 > s0 else -1)
        return out


class LLMJudge:
    """Asks a causal LM (a rollout actor) which response is better; greedy, parsed robustly."""

    def __init__(self, actor, cfg: JudgeConfig, chat: bool):
        self.actor = actor
        self.cfg = cfg
        self.chat = chat
        self.last_raw: list[str] = []

    def render(self, prompt, a, b) -> Any:
        text = self.cfg.template.format(prompt=_as_text(prompt), response0=_as_text(a), response1=_as_text(b))
        return [{"role": "user", "content": text}] if self.chat else text

    def judge(self, prompts: list, pairs: list[tuple[Any, Any]]) -> list[int]:
        requests = [self.render(p, a, b) for p, (a, b) in zip(prompts, pairs)]
        sampling = {"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                    "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
                    "generation_kwargs": None, "n": 1}
        result = ray.get(self.actor.generate.remote(requests, sampling, 0))
        self.last_raw = [c[0]["text"] for c in result["completions"]]
        return [-1 if (v := parse_judgment(t)) is None else v for t in self.last_raw]


def _as_text(value) -> str:
    if isinstance(value, (list, tuple)):  # messages
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def judge_pairs(judge, prompts: list, pairs: list[tuple[Any, Any]], *, shuffle_order: bool,
                rng: random.Random) -> list[int]:
    """The judge's answers in the caller's order, with a random half of the pairs shown swapped."""
    flips = [shuffle_order and rng.random() < 0.5 for _ in pairs]
    shown = [(b, a) if f else (a, b) for (a, b), f in zip(pairs, flips)]
    answers = judge.judge(prompts, shown)
    return [a if a < 0 or not f else 1 - a for a, f in zip(answers, flips)]


def build_judge(cfg: JudgeConfig, *, max_length: int | None, trust_remote_code: bool = False):
    """Start the judge's actor; returns (judge, actor group)."""
    from rayalign.actors.group import ActorGroup, GroupSpec

    if cfg.type == "reward_model":
        from rayalign.actors.reward import RewardModel, RewardModelConfig

        group = ActorGroup(RewardModel, GroupSpec("judge", 1, cfg.num_cpus, cfg.num_gpus),
                           args=(RewardModelConfig(cfg.model_name_or_path, batch_size=cfg.batch_size,
                                                   max_length=max_length, num_cpus=cfg.num_cpus,
                                                   num_gpus=cfg.num_gpus, trust_remote_code=trust_remote_code),))
        ray.get(group.actors[0].ready.remote())
        return RewardModelJudge(group.actors[0]), group
    from rayalign.actors.rollout import Rollout, actor_env, resolve_backend
    from rayalign.config import RolloutConfig
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
    return LLMJudge(group.actors[0], cfg, chat), group
