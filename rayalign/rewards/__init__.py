"""Ranking sampled completions: reward sources (functions, reward models) and judges.

* `SOURCES` decides what a `reward_funcs` / `reward_model_path` string names: the first
  kind whose `matches` accepts it. `module:function` (rayalign/rewards/function.py: a
  dotted module path, a colon, a dotted attribute path, exactly) is a Python reward
  function; anything else is a reward-model dir or hub id (rayalign/rewards/model.py). To
  add a kind: a module with a `RewardSource` subclass (rayalign/rewards/base.py) and its
  class in `SOURCES` before the model fallback.
* `RewardSources`: weighted sum of the run's sources; `missing_eos_penalty` is subtracted
  from completions that did not end with eos. A source may return None for a completion
  it does not apply to (TRL: skipped in the sum); a NaN or infinite score, or a completion
  no source scores, is never read as a tie: `nonfinite="error"` fails the step naming the
  source, `"penalize"` ranks that completion below every scored one.
  `probe_reward_functions` lets each source try a few real prompts before Ray starts.
* Pairwise judges: rayalign/rewards/judges.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import ray

from rayalign.rewards.base import RewardSource, ScoreError, SourceContext, as_scores
from rayalign.rewards.function import FunctionSource
from rayalign.rewards.model import RewardModelSource

SOURCES: tuple[type[RewardSource], ...] = (FunctionSource, RewardModelSource)  # asked in order


def source_class(spec: str) -> type[RewardSource]:
    """The kind of reward source `spec` names (the first of SOURCES that matches it)."""
    return next(cls for cls in SOURCES if cls.matches(spec))


def check_reward_sources(sources: Sequence[str], field: str = "reward_funcs", *,
                         trust_remote_code: bool = False) -> None:
    """Check every source (functions import, reward-model dirs: files, safetensors headers,
    custom code, their own tokenizer against their embedding), before any actor starts."""
    for i, spec in enumerate(sources):
        source_class(spec).check(spec, f"{field}[{i}]", trust_remote_code=trust_remote_code)


def source_labels(sources: Sequence[str], num_funcs: int | None = None) -> list[str]:
    """`reward_funcs[i] (spec)` for each source; past `num_funcs` entries, reward_model_path."""
    num_funcs = len(sources) if num_funcs is None else num_funcs
    return [f"reward_funcs[{i}] ({spec})" if i < num_funcs else f"reward_model_path ({spec})"
            for i, spec in enumerate(sources)]


def source_cpus(sources: Sequence[str], scoring_cfg) -> float:
    """CPUs the sources' actors take (reward models: scoring.num_cpus_per_actor each)."""
    return sum(source_class(spec).num_cpus(scoring_cfg) for spec in sources)


def probe_reward_functions(sources: Sequence[str], rows: list[dict], num_rows: int = 4) -> None:
    """Let each source try (`RewardSource.probe`; reward functions do), before Ray starts,
    a few prompts of the train set (spread over it) with two dummy completions each: the
    prompt's own text and ""."""
    picks = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, min(num_rows, len(rows)))]
    prompts, completions, ids = [], [], []
    for row in picks:
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        for completion, completion_ids in ((text, list(row["prompt_ids"])), ("", [])):
            prompts.append(prompt)
            completions.append(completion if isinstance(prompt, str) else
                               [{"role": "assistant", "content": completion}])
            ids.append(completion_ids)
    columns = {k: [r.get(k) for r in picks for _ in range(2)] for k in picks[0] if k not in ("prompt", "prompt_ids")}
    for i, spec in enumerate(sources):
        source_class(spec).probe(spec, f"reward_funcs[{i}]", prompts, completions, ids, columns)


class RewardSources:
    """The run's weighted reward sources; call `score` on the driver."""

    def __init__(self, sources: Sequence[str], weights: Sequence[float] | None, scoring_cfg,
                 max_length: int | None, trust_remote_code: bool = False, placement=None, *,
                 nonfinite: str = "error", labels: Sequence[str] | None = None):
        ctx = SourceContext(scoring_cfg, max_length, trust_remote_code, placement)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(sources), dtype=np.float64)
        self.nonfinite = nonfinite  # OnlineDPOConfig.nonfinite_scores
        self.sources = [source_class(spec)(spec, i, ctx) for i, spec in enumerate(sources)]
        starting = [ref for s in self.sources for ref in s.starting()]  # reward models load in parallel
        if starting:
            ray.get(starting)
        self.names = [s.name for s in self.sources]
        self.labels = list(labels) if labels is not None else [f"reward_funcs[{i}] ({name})"
                                                               for i, name in enumerate(self.names)]

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]], eos: list[bool],
              missing_eos_penalty: float | None = None, **columns) -> tuple[np.ndarray, dict[str, float]]:
        """Total score per completion, and each source's mean (TRL's rewards/<name>/mean)."""
        n = len(prompts)
        per_source = np.full((n, len(self.names)), math.nan)
        given = np.ones((n, len(self.names)), dtype=bool)
        pending = [s.submit(prompts, completions, completion_ids, columns) for s in self.sources]
        for i, result in enumerate(pending):
            per_source[:, i], given[:, i] = as_scores(result(), n, self.labels[i])
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
        for s in self.sources:
            s.shutdown()


__all__ = ["SOURCES", "RewardSource", "RewardSources", "ScoreError", "check_reward_sources", "probe_reward_functions",
           "source_class", "source_cpus", "source_labels"]
