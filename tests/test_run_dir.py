"""A run dir is owned: re-runs, overwrites, locks, resumes that do not fit, and model dirs
as output dirs. Each refusal names the culprit, comes before Ray starts, and leaves every
file as it was; an overwrite or a recovery never mixes two runs' checkpoints."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rayalign
from rayalign import checkpoint as ckpt
from rayalign import faults, rundir
from rayalign.config import DPOConfig, from_dict, to_yaml
from rayalign.rundir import OutputDirError, RunDir
from tests.helpers import snapshot, write_head


@pytest.fixture(scope="module")
def train_file(demo_data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("rundir-data") / "train.jsonl"
    return str(write_head(Path(demo_data_dir, "pref_train.jsonl"), path, 64))


def config(tiny_model_dir, train_file, out, **over) -> dict:
    cfg = {"model_name_or_path": tiny_model_dir, "train_dataset": train_file, "output_dir": str(out),
           "max_steps": 2, "per_device_train_batch_size": 8, "max_length": 64, "logging_steps": 1,
           "learning_rate": 1e-3, "logging": {"progress_bar": False}, "reference": {"mode": "none"},
           "learner": {"num_actors": 1, "num_cpus_per_actor": 1}, "max_failures": 0}
    cfg.update(over)
    return cfg


def old_run(out: Path, cfg: dict, step: int = 100) -> dict[str, str]:
    """An earlier run's files in `out`: a complete checkpoint (its weights are not a model:
    loading it would fail), metrics and TensorBoard events. Returns their snapshot."""
    staged = out.parent / f"staged-{out.name}"
    staged.mkdir(parents=True)
    (staged / "config.json").write_text("{}")
    (staged / "trainer_state.json").write_text(json.dumps({"step": step, "log_history": []}))
    (staged / "rayalign_config.yaml").write_text(to_yaml(from_dict(DPOConfig, cfg)))
    ckpt.commit_checkpoint(str(staged), str(out), f"checkpoint-{step}", step=step, metadata={"run_id": "old"})
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, step)))
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.old").write_bytes(b"old events")
    return snapshot(out)


def _refused(cfg: dict, error: type, culprit: str) -> None:
    import ray

    ray_was_up = ray.is_initialized()
    with pytest.raises(error) as info:
        rayalign.train_dpo(cfg)
    assert culprit in str(info.value), str(info.value)
    if not ray_was_up:
        assert not ray.is_initialized(), "Ray was started before the output dir was checked"


# ----------------------------------------------------------------------------- before Ray


def test_output_dir_equal_to_or_inside_the_model_dir_is_refused(tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = snapshot(model)
    for out in (model, model / "run"):
        _refused(config(str(model), train_file, out), OutputDirError, "the model dir model_name_or_path")
    assert snapshot(model) == before and not (model / "run").exists()


def test_overwrite_never_deletes_a_model_inside_the_output_dir(tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "checkpoint-7")
    before = snapshot(out)
    _refused(config(str(out / "checkpoint-7"), train_file, out, overwrite_output_dir=True), OutputDirError,
             "would delete model_name_or_path")
    assert snapshot(out) == before


def test_output_dir_that_is_a_file_is_refused(tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    out.write_text("notes")
    _refused(config(tiny_model_dir, train_file, out), OutputDirError, "is an existing file")
    assert out.read_text() == "notes"


def test_home_and_environment_variables_expand_in_paths(tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    cfg = from_dict(DPOConfig, config(tiny_model_dir, train_file, "~/runs/x", resume_from_checkpoint="$RUNS/c"))
    assert cfg.output_dir == str(tmp_path / "home" / "runs" / "x")
    assert cfg.resume_from_checkpoint == str(tmp_path / "runs" / "c")


def _hold_lock(out: Path):
    """Another process (a real second job's lock) holding `out` until killed."""
    code = ("import sys, time; from rayalign.config import DPOConfig; from rayalign.rundir import RunDir\n"
            f"RunDir(DPOConfig(model_name_or_path='m', train_dataset='t', output_dir={str(out)!r})).acquire()\n"
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_on_a_locked_dir_fails_naming_the_owner(tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    proc = _hold_lock(out)
    try:
        lock = (out / rundir.LOCK).read_text()
        assert json.loads(lock)["pid"] == proc.pid
        _refused(config(tiny_model_dir, train_file, out), OutputDirError, f"pid {proc.pid}")
        with pytest.raises(OutputDirError, match=f"pid {proc.pid}"):
            RunDir(from_dict(DPOConfig, config(tiny_model_dir, train_file, out))).acquire()
        assert (out / rundir.LOCK).read_text() == lock
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_lock_is_taken_over_and_released(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / rundir.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": time.time()}))
    cfg = from_dict(DPOConfig, config(tiny_model_dir, train_file, out))
    rundir.check_output_dir(cfg)  # a dead owner does not block
    with RunDir(cfg) as run:
        assert json.loads((out / rundir.LOCK).read_text())["run_id"] == run.run_id
    assert not (out / rundir.LOCK).exists()
    fresh = tmp_path / "fresh"
    with RunDir(from_dict(DPOConfig, config(tiny_model_dir, train_file, fresh))):
        assert fresh.is_dir()
    assert not fresh.exists()  # a run that wrote nothing leaves no empty dir behind


def test_resume_with_other_model_or_batch_size_names_the_fields(tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    before = old_run(out, config(tiny_model_dir, train_file, out), step=1)
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    cfg = config(str(other_model), train_file, out, max_steps=4, per_device_train_batch_size=4,
                 resume_from_checkpoint="latest")
    with pytest.raises(ckpt.CheckpointError) as info:
        rayalign.train_dpo(cfg)
    msg = str(info.value)
    assert "model_name_or_path" in msg and "per_device_train_batch_size (checkpoint: 8, now: 4)" in msg, msg
    assert "seed" not in msg and "loss_type" not in msg  # only what differs is named
    assert snapshot(out) == before


def test_resume_from_an_older_checkpoint_beside_later_ones_is_refused(tiny_model_dir, train_file, tmp_path,
                                                                     monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, train_file, out, max_steps=8)
    old_run(out, cfg, step=2)
    staged = tmp_path / "later"
    shutil.copytree(out / "checkpoint-2", staged)
    (staged / ckpt.MARKER).unlink()
    (staged / "trainer_state.json").write_text(json.dumps({"step": 6, "log_history": []}))
    ckpt.commit_checkpoint(str(staged), str(out), "checkpoint-6", step=6)
    before = snapshot(out)
    _refused({**cfg, "resume_from_checkpoint": str(out / "checkpoint-2")}, ckpt.CheckpointError,
             "later checkpoints (checkpoint-6)")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_and_latest_is_the_new_one(ray_local, tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "run"
    old_run(out, config(tiny_model_dir, train_file, out))
    rayalign.train_dpo(config(tiny_model_dir, train_file, out, overwrite_output_dir=True, save_steps=1))
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1, 2]
    assert ckpt.resolve_checkpoint(str(out), "latest").endswith("checkpoint-2")
    run_ids = {ckpt.verify_checkpoint(p)["run_id"] for _, p in ckpt.list_checkpoints(str(out))}
    assert len(run_ids) == 1 and "old" not in run_ids
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 100 not in steps and steps[0] == 1
    assert not (out / "runs" / "events.out.tfevents.old").exists()
    assert not (out / rundir.LOCK).exists()


@pytest.mark.slow
def test_a_run_failing_after_the_actors_started_leaves_the_old_run_as_it_was(ray_local, tiny_model_dir, train_file,
                                                                            tmp_path, monkeypatch):
    from rayalign.actors.group import ActorFailure

    out = tmp_path / "run"
    before = old_run(out, config(tiny_model_dir, train_file, out))
    monkeypatch.setenv(faults.ENV, f"train_step@1:{tmp_path / 'fired'}")
    with pytest.raises(ActorFailure):
        rayalign.train_dpo(config(tiny_model_dir, train_file, out, overwrite_output_dir=True))
    assert (tmp_path / "fired").exists()  # the learner died in its first step
    assert snapshot(out) == before


@pytest.mark.slow
def test_recovery_never_restores_another_runs_checkpoint(ray_local, tiny_model_dir, train_file, tmp_path,
                                                         monkeypatch):
    """The learner dies in the first step of an overwrite run: the old run's checkpoint-100 is
    still there (the new run does not own the dir yet) but recovery restarts from step 0."""
    out = tmp_path / "run"
    old_run(out, config(tiny_model_dir, train_file, out))
    monkeypatch.setenv(faults.ENV, f"train_step@1:{tmp_path / 'fired'}")
    result = rayalign.train_dpo(config(tiny_model_dir, train_file, out, overwrite_output_dir=True, max_failures=1))
    assert (tmp_path / "fired").exists()
    assert result["total_steps"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "recoveries" in r] == [0]
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2]


@pytest.mark.slow
def test_resume_at_the_end_of_a_real_run_is_refused_and_rewrites_nothing(ray_local, tiny_model_dir, train_file,
                                                                        tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, train_file, out)
    rayalign.train_dpo(cfg)
    before = snapshot(out)
    for spec in ("latest", str(out / "checkpoint-2")):
        with pytest.raises(ckpt.CheckpointError, match="at step 2 and this run ends at step 2"):
            rayalign.train_dpo({**cfg, "resume_from_checkpoint": spec})
    assert snapshot(out) == before
