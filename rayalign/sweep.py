"""Hyper-parameter sweeps with Ray Tune: `rayalign sweep --config jobs/sweep-dpo-tiny.yaml`.

A sweep file names a job config (`base_config`, plus `overrides` applied to every trial), a
`search_space` over that job's fields, and the metric to optimise:

    command: dpo
    base_config: jobs/dpo-tiny.yaml
    output_dir: outputs/sweep-dpo-tiny        # trial_<n>/ per trial, tune/ for Tune's state
    search_space:
      beta: {grid: [0.05, 0.3]}               # grid | choice | uniform | loguniform | randint
      learning_rate: {loguniform: [1.0e-4, 1.0e-3]}
    metric: eval_rewards/accuracies
    mode: max
    scheduler: {type: asha, grace_period: 20}  # or fifo

Every trial reserves all its actors' resources at once (a placement-group factory: the trial
driver's bundle, then one per learner and reference actor) and reports the DPO metrics after
each evaluation, with `step` as ASHA's time axis, so poor trials stop early. With
`reference.mode: precompute`, the reference log-probs are computed once, before any trial
starts, into one shared cache (`<output_dir>/ref-cache` unless the job names another); every
trial then reads it. The end prints a results table and the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayalign import storage
from rayalign.config import (ConfigError, DPOConfig, RewardConfig, SFTConfig, deep_merge, from_dict,
                             parse_overrides)

logger = logging.getLogger("rayalign")

COMMANDS = {"dpo": DPOConfig, "sft": SFTConfig, "reward": RewardConfig}
SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class SweepConfig:
    command: str = "dpo"
    base_config: str | None = None  # a job YAML (relative to the working directory)
    overrides: dict = field(default_factory=dict)  # applied to every trial (nested dicts allowed)
    output_dir: str = "outputs/sweep"  # a path or a storage URI
    search_space: dict = field(default_factory=dict)  # field -> {sampler: values}
    num_samples: int = 1  # repeats of the grid (random samplers draw anew each time)
    metric: str = "eval_loss"
    mode: str = "min"
    scheduler: dict = field(default_factory=lambda: {"type": "asha"})
    max_concurrent_trials: int = 1
    trial_cpus: float = 1.0  # the trial driver's own bundle (also runs its Ray Data tasks)
    seed: int = 0

    def __post_init__(self):
        def need(cond, name, msg):
            if not cond:
                raise ConfigError(f"{name}: {msg}")

        need(self.command in COMMANDS, "command", f"got {self.command!r}; allowed: {', '.join(COMMANDS)}")
        need(bool(self.search_space), "search_space", "must name at least one field to sweep")
        for key, spec in self.search_space.items():
            need(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS,
                 f"search_space.{key}", f"must be one of {{{', '.join(SAMPLERS)}}}: values, got {spec!r}")
            kind, values = next(iter(spec.items()))
            need(isinstance(values, list) and values, f"search_space.{key}.{kind}", "must be a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                need(len(values) == 2 and values[0] < values[1], f"search_space.{key}.{kind}",
                     "must be [low, high] with low < high")
        need(self.mode in ("min", "max"), "mode", f"got {self.mode!r}; allowed: 'min', 'max'")
        need(self.num_samples >= 1, "num_samples", "must be >= 1")
        need(self.max_concurrent_trials >= 1, "max_concurrent_trials", "must be >= 1")
        need(self.scheduler.get("type", "asha") in SCHEDULERS, "scheduler.type",
             f"got {self.scheduler.get('type')!r}; allowed: {', '.join(SCHEDULERS)}")
        need(set(self.scheduler) <= {"type", "grace_period", "reduction_factor", "max_t"}, "scheduler",
             f"unknown keys {sorted(set(self.scheduler) - {'type', 'grace_period', 'reduction_factor', 'max_t'})}")


def load_sweep_config(path: str | None, overrides: list[str] | dict | None = None) -> SweepConfig:
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config: file not found: {path}")
        raw = yaml.safe_load(p.read_text()) or {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    raw = {**raw, **extra}
    unknown = set(raw) - {f.name for f in dataclasses.fields(SweepConfig)}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown sweep field; allowed: "
                          f"{', '.join(f.name for f in dataclasses.fields(SweepConfig))}")
    return SweepConfig(**raw)


def _set_dotted(d: dict, key: str, value: Any) -> dict:
    head, _, rest = key.partition(".")
    if not rest:
        return {**d, head: value}
    return {**d, head: _set_dotted(d.get(head) or {}, rest, value)}


def trial_config(sweep: SweepConfig, params: dict, output_dir: str):
    """The job config of one trial: base file + overrides + sampled params + its output dir."""
    cls = COMMANDS[sweep.command]
    raw: dict = {}
    if sweep.base_config:
        p = Path(sweep.base_config)
        if not p.exists():
            raise ConfigError(f"base_config: file not found: {sweep.base_config}")
        raw = yaml.safe_load(p.read_text()) or {}
    raw = deep_merge(raw, sweep.overrides)
    for key, value in params.items():
        raw = _set_dotted(raw, key, value)
    raw = _set_dotted(raw, "output_dir", output_dir)
    raw = _set_dotted(raw, "overwrite_output_dir", True)  # the trial's own dir: a Tune retry starts it anew
    raw = _set_dotted(raw, "logging.progress_bar", False)
    return from_dict(cls, raw)


def _corner_values(spec: dict) -> list:
    kind, values = next(iter(spec.items()))
    return list(values) if kind in ("grid", "choice") else [values[0], values[1]]


def _tune_space(search_space: dict) -> dict:
    from ray import tune

    space = {}
    for key, spec in search_space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            space[key] = tune.grid_search(values)
        elif kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(*values)
    return space


def shared_cache_dir(sweep: SweepConfig, base_cfg) -> str:
    return base_cfg.reference.cache_dir or storage.join(sweep.output_dir, "ref-cache")


def run_sweep(sweep: SweepConfig) -> dict:
    """Run the sweep; returns {"trials": [...rows], "best": {...}, "reference_cache": ...}."""
    from rayalign.actors.group import ensure_ray
    from rayalign.drivers import common

    out_root = sweep.output_dir if storage.is_uri(sweep.output_dir) else os.path.abspath(sweep.output_dir)
    base_cfg = trial_config(sweep, {}, storage.join(out_root, "trial_base"))
    # Validate every value of the space (the corners of ranges) before Ray starts.
    for key, spec in sweep.search_space.items():
        for value in _corner_values(spec):
            try:
                trial_config(sweep, {key: value}, storage.join(out_root, "trial_check"))
            except ConfigError as exc:
                raise ConfigError(f"search_space.{key}: value {value!r} is invalid: {exc}") from None
    uses_cache = isinstance(base_cfg, DPOConfig) and base_cfg.reference_mode == "precompute"
    cache_dir = None
    if uses_cache:
        cache_dir = shared_cache_dir(sweep, base_cfg)
        sweep = dataclasses.replace(sweep, overrides=deep_merge(sweep.overrides, {"reference": {"cache_dir": cache_dir}}))
        base_cfg = trial_config(sweep, {}, storage.join(out_root, "trial_base"))
        common.prepare_data(base_cfg, "dpo")  # rows and tokenizer checked before Ray starts

    need_cpus = sweep.trial_cpus + sum(n * b["CPU"] for _, n, b in common.actor_groups(base_cfg))
    ensure_ray(base_cfg.ray.address, int(max(os.cpu_count() or 1, need_cpus + 2)), base_cfg.ray.namespace)
    cache_status = warm_reference_cache(base_cfg) if uses_cache else None

    from ray import tune

    bundles = [{"CPU": sweep.trial_cpus}] + [dict(b) for _, n, b in common.actor_groups(base_cfg) for _ in range(n)]
    trainable = tune.with_resources(_make_trainable(sweep, out_root),
                                    tune.PlacementGroupFactory(bundles, strategy="PACK"))
    scheduler = None
    if sweep.scheduler.get("type", "asha") == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = sweep.scheduler.get("max_t") or base_cfg.max_steps or 10**9
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t,
                                  grace_period=sweep.scheduler.get("grace_period", 1),
                                  reduction_factor=sweep.scheduler.get("reduction_factor", 2))
    tuner = tune.Tuner(
        trainable,
        param_space=_tune_space(sweep.search_space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name="tune", storage_path=out_root, verbose=1),
    )
    grid = tuner.fit()
    rows = []
    for res in grid:
        m = res.metrics or {}
        rows.append({**{k: (res.config or {}).get(k) for k in sweep.search_space},
                     sweep.metric: m.get(sweep.metric), "step": m.get("step"),
                     "status": "error" if res.error else ("stopped" if m.get("step") != m.get("total_steps")
                                                          else "done"),
                     "reference_cache_hit": m.get("reference_cache_hit"),
                     "checkpoint": m.get("checkpoint"), "output_dir": m.get("output_dir")})
    scored = [r for r in rows if r[sweep.metric] is not None]
    best = (max if sweep.mode == "max" else min)(scored, key=lambda r: r[sweep.metric]) if scored else None
    summary = {"trials": rows, "best": best, "reference_cache": cache_status, "reference_cache_dir": cache_dir}
    storage.write_text_atomic(storage.join(out_root, "sweep_results.json"), json.dumps(summary, indent=2, default=str))
    print(format_table(rows, list(sweep.search_space), sweep.metric))
    if best:
        print(f"best trial: {sweep.metric}={best[sweep.metric]:.4f}  checkpoint: {best['checkpoint']}")
    return summary


def _make_trainable(sweep: SweepConfig, out_root: str):
    def trial(config: dict) -> None:
        from ray import tune

        from rayalign.drivers.offline import train

        ctx = tune.get_context()
        name = f"trial_{ctx.get_trial_id()}"
        cfg = trial_config(sweep, config, storage.join(out_root, name))
        total = cfg.max_steps

        def report(metrics: dict) -> None:
            tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))} |
                        {"total_steps": total, "output_dir": cfg.output_dir})

        train(cfg, report=report)

    return trial


def warm_reference_cache(cfg: DPOConfig) -> str:
    """Compute the precompute-mode reference log-probs of the train and eval data into the
    shared cache once ("miss"), or find them there ("hit")."""
    from rayalign.drivers import common

    data = common.prepare_data(cfg, "dpo")
    train_ds, _ = data.build(cfg)  # the eval set's cache is filled here, eagerly
    if data.cache_hit:
        return "hit"
    if not data.cache_complete:  # streamed schedule: build() left the scoring to the first pass
        train_ds(0).materialize()  # streams every block through the reference stage into the cache
        data.end_epoch(cfg)
    if not data.cache_complete:
        raise RuntimeError(f"reference cache under {data._cache_dir} is incomplete after the warm-up")
    return "miss"


def format_table(rows: list[dict], params: list[str], metric: str) -> str:
    cols = params + [metric, "step", "status", "checkpoint"]
    cells = [[("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c]))
              for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(row) for row in cells)])

