"""Clean exits of `rayalign dpo` on a local Ray it starts itself: SIGINT and SIGTERM stop the
run with exit code 130 / 143 and one line saying so; after SIGKILL of the driver, its reaper
kills what is left of that Ray; a normal exit leaves nothing behind either.

Each driver gets its own RAY_TMPDIR, so the test counts that Ray's processes (by the temp dir
in their command line or environment) without looking at any other Ray on the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def ray_processes(ray_tmp: str) -> list[str]:
    """Running processes of the Ray whose temp dir is `ray_tmp` (the reaper included)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            if ray_tmp in cmdline or proc.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(f"{proc.pid} {cmdline[:80]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until_gone(ray_tmp: str, timeout_s: float) -> tuple[list[str], float]:
    """(processes still running after timeout_s, or [] ; seconds it took)."""
    start = time.monotonic()
    while (left := ray_processes(ray_tmp)) and time.monotonic() - start < timeout_s:
        time.sleep(0.2)
    return left, time.monotonic() - start


@pytest.fixture
def driver(tiny_model_dir, demo_data_dir, tmp_path):
    """Start `python -m rayalign dpo` on its own local Ray; yields (process, output dir, Ray
    temp dir, log path); kills whatever is left of it afterwards."""
    # Short and under /tmp: Ray's unix sockets live below it (107-character path limit).
    ray_tmp = tempfile.mkdtemp(prefix="rayalign-sig-", dir="/tmp")
    out, log = tmp_path / "out", tmp_path / "driver.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)  # never join another Ray on this machine

    def start(max_steps: int, extra: tuple | list = ()) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "rayalign", "dpo", "--config", "jobs/dpo-tiny.yaml",
               "--model_name_or_path", tiny_model_dir,
               "--train_dataset", f"{demo_data_dir}/pref_train.jsonl",
               "--eval_dataset", f"{demo_data_dir}/pref_eval.jsonl", "--output_dir", str(out),
               "--max_steps", str(max_steps), "--logging_steps", "1", "--eval_steps", "1000",
               "--save_steps", "1000", "--learner.num_actors", "1", *extra]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs[-1]

    procs: list[subprocess.Popen] = []
    yield start, out, ray_tmp, log
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for line in ray_processes(ray_tmp):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for_training(proc: subprocess.Popen, out: Path, log: Path, timeout_s: float = 300) -> None:
    """Until the first train step is in metrics.jsonl (the actors and Ray are all up)."""
    deadline = time.monotonic() + timeout_s
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any("loss" in json.loads(x) for x in metrics.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.5)
    pytest.fail(f"the driver did not start training (rc={proc.poll()}):\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_the_run_and_its_ray(driver, signum, code):
    start, out, ray_tmp, log = driver
    proc = start(max_steps=400)
    wait_for_training(proc, out, log)
    assert len(ray_processes(ray_tmp)) >= 5  # gcs, raylet, agents, learner ... are found
    t0 = time.monotonic()
    proc.send_signal(signum)
    rc = proc.wait(timeout=60)
    exited_s = time.monotonic() - t0
    left, _ = wait_until_gone(ray_tmp, timeout_s=3)
    text = log.read_text()
    assert rc == code, text[-3000:]
    lines = [x for x in text.splitlines() if "interrupted by" in x]
    assert lines == [f"rayalign dpo: interrupted by {signal.Signals(signum).name}; its actors and the local "
                     "Ray it started are stopped"], text[-3000:]
    assert left == [], f"{len(left)} process(es) of the driver's Ray left 3 s after it exited: {left}"
    assert exited_s < 30


def test_sigkill_of_the_driver_leaves_no_ray_process(driver):
    start, out, ray_tmp, log = driver
    proc = start(max_steps=400)
    wait_for_training(proc, out, log)
    before = len(ray_processes(ray_tmp))
    proc.kill()  # the driver alone, not its process group: only the reaper can clean up now
    proc.wait(timeout=10)
    left, took = wait_until_gone(ray_tmp, timeout_s=10)
    assert left == [], f"{len(left)} of {before} process(es) of the driver's Ray outlived it by 10 s: {left}"
    print(f"{before} Ray processes gone {took:.1f}s after the driver's SIGKILL")


def test_normal_exit_leaves_no_ray_process(driver):
    start, out, ray_tmp, log = driver
    proc = start(max_steps=2)
    rc = proc.wait(timeout=300)
    assert rc == 0, log.read_text()[-3000:]
    left, _ = wait_until_gone(ray_tmp, timeout_s=2)
    assert left == [], f"{len(left)} process(es) of the driver's Ray left after a normal exit: {left}"


def test_save_on_interrupt_checkpoints_the_finished_step_then_exits_130(driver):
    start, out, ray_tmp, log = driver
    proc = start(max_steps=400, extra=["--save_on_interrupt", "true"])
    wait_for_training(proc, out, log)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "saving a checkpoint after the current step" in text, text[-3000:]
    from rayalign import checkpoint as ckpt

    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1, saved
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < 400
    ckpt.check_resumable(str(saved[0]))  # complete, current format: resume_from_checkpoint takes it
    assert ckpt.load_trainer_state(str(saved[0]))["step"] == step
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if x.strip() and "loss" in json.loads(x)]
    assert logged and logged[-1] == step  # the checkpoint holds the last step the metrics show
    left, _ = wait_until_gone(ray_tmp, timeout_s=3)
    assert left == [], left
