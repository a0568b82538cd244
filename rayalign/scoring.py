"""Ranking sampled completions: reward functions, reward models, pairwise judges.

* `RewardSources`: weighted sum of plain Python reward functions (`module:function`,
  called TRL-style with prompts, completions, completion_ids and the dataset's other
  columns) and reward models (`RewardModel` actors); `missing_eos_penalty` is subtracted
  from completions that did not end with eos. A function may return None for a completion
  it does not apply to (TRL: skipped in the sum); a NaN or infinite score, or a completion
  no source scores, is never read as a tie: `nonfinite="error"` fails the step naming the
  source, `"penalize"` ranks that completion below every scored one.
  `probe_reward_functions` calls each function once on a few real prompts before Ray starts.
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


class ScoreError(ValueError):
    """Scores that cannot rank completions (wrong count, not numbers, NaN / inf); the
    message names the reward source."""


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


def check_reward_sources(sources: Sequence[str], field: str = "reward_funcs", *,
                         trust_remote_code: bool = False) -> None:
    """Import every function and check every reward-model dir (files, safetensors headers,
    custom code, its own tokenizer against its embedding), before any actor starts."""
    for i, spec in enumerate(sources):
        name = f"{field}[{i}]"
        if is_function_spec(spec):
            load_function(spec, name)
        else:
            check_scorer_dir(spec, name, trust_remote_code=trust_remote_code)


def check_scorer_dir(path: str, field: str, *, trust_remote_code: bool = False) -> None:
    """`check_model_dir` for a model that brings its own tokenizer (reward models, judges)."""
    from rayalign.config import is_adapter_dir
    from rayalign.models.loading import check_model_dir, load_tokenizer

    local = os.path.isdir(os.path.expanduser(path)) and not is_adapter_dir(path)
    check_model_dir(path, field, trust_remote_code=trust_remote_code)  # files first: clearer than a tokenizer error
    if local:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, field=field)
        check_model_dir(path, field, trust_remote_code=trust_remote_code, tokenizer=tokenizer, tokenizer_field=field)


def check_judge_model(cfg: JudgeConfig, field: str = "judge", *, trust_remote_code: bool = False) -> None:
    check_scorer_dir(cfg.model_name_or_path, f"{field}.model_name_or_path", trust_remote_code=trust_remote_code)


def as_scores(values: Any, n: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """A reward function's return value as (float scores, mask of the ones given): one number
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


def source_labels(sources: Sequence[str], num_funcs: int | None = None) -> list[str]:
    """`reward_funcs[i] (spec)` for each source; past `num_funcs` entries, reward_model_path."""
    num_funcs = len(sources) if num_funcs is None else num_funcs
    return [f"reward_funcs[{i}] ({spec})" if i < num_funcs else f"reward_model_path ({spec})"
            for i, spec in enumerate(sources)]


def probe_reward_functions(sources: Sequence[str], rows: list[dict], num_rows: int = 4) -> None:
    """Call each reward function once, before Ray starts, on a few prompts of the train set
    (spread over it) with two dummy completions each: the prompt's own text and "". Raising,
    the wrong count, values that are not numbers, or nothing but NaN / None fails here,
    naming the function, instead of after the actors have loaded."""
    picks = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, min(num_rows, len(rows)))]
    prompts, completions, ids = [], [], []
    for row in picks:
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        for completion, completion_ids in ((text, list(row["prompt_ids"])), ("", [])):
            prompts.append(prompt)
            completions.append(completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}])
            ids.append(completion_ids)
    columns = {k: [r.get(k) for r in picks for _ in range(2)] for k in picks[0] if k not in ("prompt", "prompt_ids")}
    for i, spec in enumerate(sources):
        if not is_function_spec(spec):
            continue
        label = f"reward_funcs[{i}] ({spec})"
        fn = load_function(spec, f"reward_funcs[{i}]")
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
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


class RewardSources:
    """Weighted reward functions and reward-model actors; call `score` on the driver."""

    def __init__(self, sources: Sequence[str], weights: Sequence[float] | None, scoring_cfg,
                 max_length: int | None, trust_remote_code: bool = False, placement=None, *,
                 nonfinite: str = "error", labels: Sequence[str] | None = None):
        from rayalign.actors.group import ActorGroup, GroupSpec
        from rayalign.actors.reward import RewardModel, RewardModelConfig

        self.names: list[str] = []
        self.functions: dict[int, Callable] = {}
        self.models: dict[int, Any] = {}
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(sources), dtype=np.float64)
        self.nonfinite = nonfinite  # OnlineDPOConfig.nonfinite_scores
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
        self.labels = list(labels) if labels is not None else [f"reward_funcs[{i}] ({name})"
                                                               for i, name in enumerate(self.names)]
        if self._groups:
            ray.get([g.actors[0].ready.remote() for g in self._groups])

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]], eos: list[bool],
              missing_eos_penalty: float | None = None, **columns) -> tuple[np.ndarray, dict[str, float]]:
        """Total score per completion, and each source's mean (TRL's rewards/<name>/mean)."""
        n = len(prompts)
        per_source = np.full((n, len(self.names)), math.nan)
        given = np.ones((n, len(self.names)), dtype=bool)
        refs = {i: actor.score.remote(prompts, completions) for i, actor in self.models.items()}
        for i, fn in self.functions.items():
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            per_source[:, i], given[:, i] = as_scores(values, n, self.labels[i])
        for i, ref in refs.items():
            per_source[:, i], given[:, i] = as_scores(ray.get(ref), n, self.labels[i])
        finite = np.isfinite(per_source)
        total = np.where(finite, per_source * self.weights[None, :], 0.0).sum(axis=1)
        bad = (given & ~finite).any(axis=1) | ~given.any(axis=1)  # NaN / inf, or no source applies
        if bad.any():
            total = self._nonfinite(total, bad, per_source, given, finite)
        if missing_eos_penalty is not None:
            total = total - missing_eos_penalty * (~np.asarray(eos, dtype=bool))
        means = {f"rewards/{name}/mean": float(per_source[finite[:, i], i].mean()) if finite[:, i].any() else math.nan
                 for i, name in enumerate(self.names)}
        means["rewards/nonfinite"] = float(bad.mean())
        return total, means

    def _nonfinite(self, total, bad, per_source, given, finite) -> np.ndarray:
        """`error`: raise naming each source that gave NaN / inf; `penalize`: those completions
        score 1 below the step's lowest finite total, so they lose to any scored sibling."""
        culprits = [f"{self.labels[i]}: {int((given[:, i] & ~finite[:, i]).sum())} of {len(total)} scores "
                    f"non-finite (e.g. {per_source[given[:, i] & ~finite[:, i], i][0]})"
                    for i in range(len(self.names)) if (given[:, i] & ~finite[:, i]).any()]
        unscored = np.flatnonzero(~given.any(axis=1))
        if len(unscored):
            culprits.append(f"completions {unscored[:5].tolist()}: every reward source returned None "
                            f"({', '.join(self.labels)})")
        if self.nonfinite != "penalize" or bad.all():
            why = "every completion of the step" if bad.all() and self.nonfinite == "penalize" else \
                "nonfinite_scores=error"
            raise ScoreError(f"non-finite reward scores would rank completions as ties ({why}): "
                             + "; ".join(culprits))
        return np.where(bad, total[~bad].min() - 1.0, total)

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
    """Prefers the completion a reward model scores higher (equal scores: a tie). A NaN or
    infinite score is no tie: `nonfinite="error"` raises naming `name`; `"penalize"` makes
    that side lose (both non-finite: a tie)."""

    def __init__(self, actor, name: str = "judge", nonfinite: str = "error"):
        self.actor = actor
        self.name = name
        self.nonfinite = nonfinite

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


def build_judge(cfg: JudgeConfig, *, max_length: int | None, trust_remote_code: bool = False,
                nonfinite: str = "error"):
    """Start the judge's actor; returns (judge, actor group)."""
    from rayalign.actors.group import ActorGroup, GroupSpec

    if cfg.type == "reward_model":
        from rayalign.actors.reward import RewardModel, RewardModelConfig

        group = ActorGroup(RewardModel, GroupSpec("judge", 1, cfg.num_cpus, cfg.num_gpus),
                           args=(RewardModelConfig(cfg.model_name_or_path, batch_size=cfg.batch_size,
                                                   max_length=max_length, num_cpus=cfg.num_cpus,
                                                   num_gpus=cfg.num_gpus, trust_remote_code=trust_remote_code),))
        ray.get(group.actors[0].ready.remote())
        return RewardModelJudge(group.actors[0], f"judge ({cfg.model_name_or_path})", nonfinite), group
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
