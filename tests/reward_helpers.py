"""Broken (and recording) reward functions for the online tests, importable as
`tests.reward_helpers:<name>` (TRL's signature: prompts, completions, **columns)."""

from __future__ import annotations

import math

CALLS = {"nan_after_probe": 0}


def raises(prompts, completions, **kwargs):
    raise RuntimeError("reward service unavailable")


def wrong_count(prompts, completions, **kwargs):
    return [0.0]


def strings(prompts, completions, **kwargs):
    return ["good" for _ in completions]


def all_nan(prompts, completions, **kwargs):
    return [math.nan for _ in completions]


def all_none(prompts, completions, **kwargs):
    return [None for _ in completions]


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def nan_after_probe(prompts, completions, **kwargs):
    """Finite on its first call (the pre-start probe), NaN for one completion afterwards."""
    CALLS["nan_after_probe"] += 1
    scores = [float(len(c)) for c in completions]
    if CALLS["nan_after_probe"] > 1:
        scores[1] = math.nan
    return scores


SEEN: list[dict] = []


def record(prompts, completions, completion_ids=None, **columns):
    """Keeps what it was given in SEEN (the online prompt-path tests check what reward
    functions receive); scores a completion by its length."""
    SEEN.append({"prompts": prompts, "columns": columns})
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]
