"""Ray Tune sweep of the tiny DPO job on a real local Ray: two trials, each with its actors in
the trial's placement group, the reference log-probs computed once into a shared cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayalign.config import ConfigError
from rayalign.sweep import SweepConfig, load_sweep_config, run_sweep, trial_config

ROOT = Path(__file__).resolve().parent.parent


def _sweep(tiny_model_dir, demo_data_dir, out, **over) -> SweepConfig:
    base = {
        "command": "dpo", "base_config": str(ROOT / "jobs/dpo-tiny.yaml"), "output_dir": str(out),
        "overrides": {"model_name_or_path": tiny_model_dir,
                      "train_dataset": f"{demo_data_dir}/pref_train.jsonl",
                      "eval_dataset": f"{demo_data_dir}/pref_eval.jsonl",
                      "max_steps": 6, "eval_steps": 3, "save_steps": 6, "logging_steps": 3,
                      "learner": {"num_actors": 1, "num_cpus_per_actor": 1, "zero_stage": 0}},
        "search_space": {"beta": {"grid": [0.1, 0.5]}},
        "metric": "eval_rewards/accuracies", "mode": "max",
        "scheduler": {"type": "asha", "grace_period": 3, "reduction_factor": 2},
    }
    base.update(over)
    return SweepConfig(**base)


def test_sweep_yaml_in_jobs_validates():
    sweep = load_sweep_config(ROOT / "jobs/sweep-dpo-tiny.yaml")
    cfg = trial_config(sweep, {"beta": 0.3, "loss_type": "ipo", "learning_rate": 3e-4}, "/tmp/x")
    assert cfg.beta == 0.3 and cfg.loss_type == ("ipo",) and cfg.learner.num_actors == 1


@pytest.mark.parametrize("over, field", [
    ({"search_space": {"beta": {"grid": [0.1, -1.0]}}}, "search_space.beta"),
    ({"search_space": {"no_such_field": {"grid": [1, 2]}}}, "no_such_field"),
    ({"search_space": {"beta": {"normal": [0, 1]}}}, "search_space.beta"),
    ({"search_space": {"learning_rate": {"loguniform": [1e-3, 1e-4]}}}, "search_space.learning_rate"),
    ({"mode": "best"}, "mode"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type"),
])
def test_bad_sweeps_fail_before_ray(over, field, tiny_model_dir, demo_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=field):
        run_sweep(_sweep(tiny_model_dir, demo_data_dir, tmp_path / "bad", **over))
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_two_trial_sweep_shares_one_reference_cache(ray_local, tiny_model_dir, demo_data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    summary = run_sweep(_sweep(tiny_model_dir, demo_data_dir, out))
    trials = summary["trials"]
    assert len(trials) == 2 and sorted(t["beta"] for t in trials) == [0.1, 0.5]
    assert all(t["status"] != "error" for t in trials), trials
    # Computed once by the warm-up, read by every trial.
    assert summary["reference_cache"] == "miss"
    assert all(t["reference_cache_hit"] == 1.0 for t in trials if t["status"] == "done"), trials
    cache_keys = sorted(p.name for p in Path(summary["reference_cache_dir"]).iterdir())
    assert len(cache_keys) == 2  # the train file's cache and the eval file's
    for t in trials:
        metrics = [json.loads(x) for x in Path(t["output_dir"], "metrics.jsonl").read_text().splitlines()]
        assert any("eval_rewards/accuracies" in m for m in metrics)
    done = [t for t in trials if t["status"] == "done"]
    assert done and all(Path(t["checkpoint"], "rayalign_complete.json").exists() for t in done)
    best = summary["best"]
    assert best["eval_rewards/accuracies"] == max(t["eval_rewards/accuracies"] for t in trials)
    printed = capsys.readouterr().out
    assert "best trial" in printed and str(best["checkpoint"]) in printed
    assert json.loads((out / "sweep_results.json").read_text())["best"]["checkpoint"] == best["checkpoint"]
