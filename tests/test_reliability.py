"""Fault injection on a real local Ray: learners killed mid-run (ray.kill, SIGKILL of the
process), a learner dying inside a checkpoint save, and the driver itself killed. Every
interrupted run must end where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import rayalign
from rayalign import checkpoint as ckpt
from rayalign import faults
from tests.helpers import write_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


@pytest.fixture(scope="module")
def data(demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rel-data")
    write_head(Path(demo_data_dir, "pref_train.jsonl"), d / "train.jsonl", 256)
    write_head(Path(demo_data_dir, "pref_eval.jsonl"), d / "eval.jsonl", 32)
    return d


def config(tiny_model_dir, data, out, **over) -> dict:
    cfg = {
        "model_name_or_path": tiny_model_dir, "train_dataset": str(data / "train.jsonl"),
        "eval_dataset": str(data / "eval.jsonl"), "output_dir": str(out), "max_steps": STEPS,
        "per_device_train_batch_size": 8, "learning_rate": 2e-3, "lr_scheduler_type": "linear",
        "logging_steps": 1, "save_steps": 4, "max_length": 64, "seed": 5, "max_failures": 2,
        "logging": {"progress_bar": False},
        "learner": {"num_actors": 2, "num_cpus_per_actor": 0.5, "zero_stage": 2, "collective_timeout_s": 120},
        "reference": {"mode": "precompute", "num_actors": 1, "num_cpus_per_actor": 0.5,
                      "cache_dir": str(data / "ref-cache")},
    }
    cfg.update(over)
    return cfg


def losses(out) -> dict[int, float]:
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def recoveries(out) -> list[dict]:
    return [r for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "recoveries" in r]


@pytest.fixture(scope="module")
def clean_run(ray_local, tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "clean"
    return out, rayalign.train_dpo(config(tiny_model_dir, data, out))


def assert_same_run(out, clean):
    clean_out, clean_result = clean
    want, got = losses(clean_out), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-3, abs=1e-4), step
    final = json.loads(Path(out, "checkpoint-12", "trainer_state.json").read_text())
    assert final["global_step"] == STEPS  # transformers' TrainerState layout


def _kill_learner_when(out, min_step: int, how: str, fired: dict) -> threading.Thread:
    import ray

    def run():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = losses(out) if Path(out, "metrics.jsonl").exists() else {}
            if steps and max(steps) >= min_step and ckpt.list_checkpoints(str(out)):
                names = [n for n in ray.util.list_named_actors() if n.startswith("learner-1-")]
                if names:
                    actor = ray.get_actor(names[0])
                    if how == "ray.kill":
                        ray.kill(actor, no_restart=True)
                    else:
                        os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
                    fired["at"] = max(steps)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("how", ["ray.kill", "sigkill"])
def test_learner_killed_mid_run_recovers_to_the_same_result(how, clean_run, tiny_model_dir, data, tmp_path):
    out = tmp_path / how
    fired: dict = {}
    killer = _kill_learner_when(out, 5, how, fired)
    result = rayalign.train_dpo(config(tiny_model_dir, data, out))
    killer.join(timeout=5)
    assert fired, "the learner was never killed"
    assert len(recoveries(out)) == 1
    assert_same_run(out, clean_run)
    assert result["metrics"]["eval_loss"] == pytest.approx(clean_run[1]["metrics"]["eval_loss"], rel=1e-3)


def test_crash_inside_checkpoint_save_keeps_the_previous_one(clean_run, tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "save-crash"
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, f"save@8:{marker}")
    rayalign.train_dpo(config(tiny_model_dir, data, out))
    assert marker.exists()  # a learner died while checkpoint-8 was being written
    rec = recoveries(out)
    assert len(rec) == 1 and rec[0]["step"] == 4  # restored from checkpoint-4, the last complete one
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".staging-*"))
    for _, path in ckpt.list_checkpoints(str(out)):
        ckpt.verify_checkpoint(path)
    assert_same_run(out, clean_run)


def test_max_failures_zero_fails_with_a_clear_error(ray_local, tiny_model_dir, data, tmp_path, monkeypatch):
    from rayalign.actors.group import ActorFailure

    out = tmp_path / "no-retry"
    monkeypatch.setenv(faults.ENV, f"train_step@3:{tmp_path / 'fired'}")
    with pytest.raises(ActorFailure, match=r"learner actor \d died.*max_failures=0"):
        rayalign.train_dpo(config(tiny_model_dir, data, out, max_failures=0, max_steps=4))


def test_driver_killed_then_resumed_continues_with_the_same_losses(clean_run, tiny_model_dir, data, tmp_path):
    out = tmp_path / "driver-kill"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tiny_model_dir, data, out)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "rayalign", "dpo", "--config", str(cfg_path)], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            done = [s for s, _ in ckpt.list_checkpoints(str(out))]
            if done and Path(out, "metrics.jsonl").exists() and max(losses(out), default=0) >= 6:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the driver ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = max(losses(out))
    assert killed_at < STEPS
    rayalign.train_dpo(config(tiny_model_dir, data, out, resume_from_checkpoint="latest"))
    assert_same_run(out, clean_run)


def online_config(model_dir, demo_data_dir, out, **over) -> dict:
    cfg = {
        "model_name_or_path": model_dir, "train_dataset": f"{demo_data_dir}/prompts_train.jsonl",
        "output_dir": str(out), "max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 8,
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "logging_steps": 1, "max_length": 64,
        "max_new_tokens": 12, "temperature": 1.0, "seed": 3, "max_failures": 2,
        "reward_funcs": ["rayalign.demo.task:demo_reward"], "logging": {"progress_bar": False},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 0.5},
        "reference": {"mode": "actor", "num_cpus_per_actor": 0.25},
        "rollout": {"backend": "hf", "num_actors": 2, "num_cpus_per_actor": 0.5},
    }
    cfg.update(over)
    return cfg


def test_online_rollout_actor_killed_mid_run_recovers_to_the_same_result(ray_local, sft_model_dir, demo_data_dir,
                                                                         tmp_path):
    """A rollout actor dies (SIGKILL) after checkpoint-2: the driver restarts every group,
    restores checkpoint-2 (the engines get its weights as version 2) and ends with the
    same per-step losses and scores as a run that was never interrupted."""
    import ray

    clean = tmp_path / "clean"
    rayalign.train_online_dpo(online_config(sft_model_dir, demo_data_dir, clean))
    out = tmp_path / "killed"
    fired: dict = {}

    def kill():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = losses(out) if Path(out, "metrics.jsonl").exists() else {}
            if steps and max(steps) >= 3 and ckpt.list_checkpoints(str(out)):
                names = [n for n in ray.util.list_named_actors() if n.startswith("rollout-1-")]
                if names:
                    os.kill(ray.get(ray.get_actor(names[0]).pid.remote()), signal.SIGKILL)
                    fired["at"] = max(steps)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    result = rayalign.train_online_dpo(online_config(sft_model_dir, demo_data_dir, out))
    killer.join(timeout=5)
    assert fired, "the rollout actor was never killed"
    assert len(recoveries(out)) == 1
    rows = {r["step"]: r for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    want = {r["step"]: r for r in map(json.loads, Path(clean, "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(rows) == list(range(1, 7))
    for step, r in want.items():
        for key in ("loss", "objective/scores", "objective/kl"):
            assert rows[step][key] == pytest.approx(r[key], rel=1e-3, abs=1e-5), (step, key)
    # the restarted engines were given the restored weights before sampling again
    versions = [json.loads(x)["version"] for x in Path(out, "weight_sync.jsonl").read_text().splitlines()]
    assert versions[0] == 0 and versions[-1] == 6 and versions.count(2) == 2
    assert result["total_steps"] == 6
