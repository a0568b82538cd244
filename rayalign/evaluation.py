"""Pure pieces of the eval job (`rayalign eval`): which models, which pairs are shown
swapped, win rates and means with 95% intervals, and the plot across models.

* Win rate = (wins + ties / 2) / n over the pairwise comparisons, with the Wilson score
  interval of that proportion. Each comparison scores 1, 0.5 or 0; a tie has less variance
  than a Bernoulli draw, so with ties the Wilson interval is conservative (never too
  narrow), and unlike the normal approximation it stays inside [0, 1] and does not
  collapse to a point at 0 or 1 on small n.
* Position bias: exactly half of the comparisons (a seeded choice, the same for every
  model) show the baseline first; the answers are mapped back before counting, so a judge
  that always picks the first position scores exactly 0.5.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

from rayalign.config import ConfigError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: its label, where it is, and its place on the plot's x axis."""

    name: str
    path: str
    x: float | None = None


def expand_models(entries: Sequence[str | dict], field: str = "models") -> list[ModelSpec]:
    """`EvalConfig.models` as ModelSpecs, in order; a run dir becomes its complete
    `checkpoint-<step>` dirs ordered by step (the final model at its root is a copy of the
    last one). Paths are checked here, before any actor starts."""
    from rayalign import checkpoint as ckpt
    from rayalign.models.loading import _check_exists

    out: list[ModelSpec] = []
    for i, entry in enumerate(entries):
        name_field = f"{field}[{i}]"
        if isinstance(entry, dict):
            path, name, x = entry["path"].strip(), entry.get("name"), entry.get("x")
        else:
            entry = entry.strip()
            name, sep, path = entry.partition("=")
            if not sep or os.path.exists(entry):
                name, path = None, entry
            x = None
        _check_exists(path, name_field)
        steps = ckpt.list_checkpoints(path) if os.path.isdir(path) else []
        is_model = any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))
        if os.path.isdir(path) and not steps and not is_model:
            raise ConfigError(f"{name_field}: {path} is neither a model dir (config.json) nor a run dir "
                              "with a complete checkpoint-<step> dir")
        if steps:
            if x is not None:
                raise ConfigError(f"{name_field}.x: a run dir's checkpoints are placed by their steps")
            base = name or os.path.basename(os.path.normpath(path))
            out += [ModelSpec(f"{base}@{step}", ckpt_path, float(step)) for step, ckpt_path in steps]
        else:
            out.append(ModelSpec(name or os.path.basename(os.path.normpath(path)) or path, path,
                                 None if x is None else float(x)))
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{field}: labels {dupes} appear more than once; name them (name=path)")
    return out


# ----------------------------------------------------------------------------- judging


def balanced_swaps(n: int, seed: int) -> list[bool]:
    """Exactly n // 2 of n positions True (shown swapped), chosen by `seed`."""
    chosen = set(random.Random(seed).sample(range(n), n // 2))
    return [i in chosen for i in range(n)]


def judge_swapped(judge, prompts: list, pairs: list[tuple[Any, Any]], swapped: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Ask `judge` about `pairs`, the swapped ones shown as (b, a). Returns the answers in
    the caller's orientation (0: first wins, 1: second wins, -1: tie or no usable answer)
    and the answers as given (0 = the position shown first)."""
    shown = [(b, a) if s else (a, b) for (a, b), s in zip(pairs, swapped)]
    given = [int(a) for a in judge.judge(prompts, shown)]
    if len(given) != len(pairs):
        raise ValueError(f"judge: {len(given)} answers for {len(pairs)} pairs")
    return [a if a < 0 or not s else 1 - a for a, s in zip(given, swapped)], given


def outcome_score(answer: int) -> float:
    """A comparison's score for the first of the pair: win 1, tie 0.5, loss 0."""
    return 0.5 if answer < 0 else 1.0 - answer


# ----------------------------------------------------------------------------- statistics


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion successes / n (None when n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (1) the lower (upper) end is exactly 0 (1); rounding must not move it.
    return (0.0 if successes <= 0 else center - half), (1.0 if successes >= n else center + half)


def win_rate(answers: Sequence[int], given: Sequence[int] | None = None) -> dict:
    """Win rate of the first of each pair (answers as `judge_swapped` returns them), its
    Wilson 95% interval, the counts, and how often the judge picked the position shown first."""
    wins = sum(a == 0 for a in answers)
    losses = sum(a == 1 for a in answers)
    ties = len(answers) - wins - losses
    n = len(answers)
    out = {"value": (wins + 0.5 * ties) / n if n else None, "ci95": wilson_interval(wins + 0.5 * ties, n),
           "wins": wins, "ties": ties, "losses": losses, "n": n}
    if given is not None:
        decided = [g for g in given if g >= 0]
        out["first_position_rate"] = sum(g == 0 for g in decided) / len(decided) if decided else None
    return out


def mean_interval(values: Sequence[float], z: float = Z95) -> dict:
    """Mean with a 95% interval: Wilson for 0/1 values (a checker's pass rate), otherwise the
    normal approximation mean ± z·s/√n. NaN values (a checker's None) are left out."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    if all(v in (0.0, 1.0) for v in vals):
        return {"mean": mean, "ci95": wilson_interval(sum(vals), n, z), "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    half = z * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": (mean - half, mean + half) if n > 1 else None, "n": n}


# ----------------------------------------------------------------------------- plot


def plot_models(models: list[dict], panels: list[tuple[str, str, str]], path: str, xlabel: str = "x") -> str | None:
    """One PNG, a panel per (key, value field, title) present: the metric of each model with
    its 95% interval, against x (steps, sizes) when every model has one, else in list order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [p for p in panels if any(m.get(p[0]) for m in models)]
    if not present:
        return None
    numeric = all(m.get("x") is not None for m in models)
    xs = [m["x"] if numeric else i for i, m in enumerate(models)]
    fig, axes = plt.subplots(1, len(present), figsize=(4.8 * len(present), 3.6), squeeze=False)
    for ax, (key, field, title) in zip(axes[0], present):
        pts = [(x, m[key][field], m[key].get("ci95")) for x, m in zip(xs, models) if m.get(key)
               and m[key].get(field) is not None]
        px = [p[0] for p in pts]
        py = [p[1] for p in pts]
        err = [[max(0.0, y - (ci[0] if ci else y)) for _, y, ci in pts],
               [max(0.0, (ci[1] if ci else y) - y) for _, y, ci in pts]]
        ax.errorbar(px, py, yerr=err, marker="o", capsize=4)
        if key == "win_rate":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel(xlabel if numeric else "model")
        if not numeric:
            ax.set_xticks(xs, [m["name"] for m in models], rotation=30, ha="right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
