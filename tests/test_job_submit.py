"""`ray job submit` against a real local head started with cluster/local/start-head.sh on free
ports: the tiny DPO job runs on it and leaves a checkpoint and metrics; a bad config fails
the job with a non-zero exit code. Only the head this test started is stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _free_worker_range(taken: list[int], width: int = 100) -> int:
    """The first port of `width` consecutive free ports below the kernel's ephemeral range (so
    no port the OS hands out, nor any of `taken`, can land in it)."""
    lo_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for start in range(20000, lo_ephemeral - width, width):
        if any(start <= p < start + width for p in taken):
            continue
        socks = []
        try:
            for p in range(start, start + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free range of worker ports below the ephemeral range")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


@pytest.fixture
def local_head():
    """A Ray head in its own session (so its processes, and only they, can be stopped)."""
    ports = _free_ports(7)
    port, dashboard, client, agent, agent_grpc, runtime_env_agent, metrics = ports
    worker_lo = _free_worker_range(ports)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_PORT": str(port), "RAY_DASHBOARD_PORT": str(dashboard),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "cluster/local/start-head.sh"), "--block", "--num-cpus", "4", "--num-gpus", "0",
         "--temp-dir", temp_dir, "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
         "--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + 99)],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{proc.stdout.read()}")
        ok = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", address],
                            env=env, capture_output=True, text=True)
        if ok.returncode == 0:
            break
        time.sleep(2)
    else:
        pytest.fail("the local head did not answer within 120 s")
    try:
        yield address, env
    finally:
        sid = os.getsid(proc.pid)
        os.killpg(sid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
        for pid in _session_pids(sid):  # workers that outlived the head
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
         "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "-m", "rayalign", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_tiny_dpo_on_a_local_head(local_head, tiny_model_dir, demo_data_dir, tmp_path):
    address, env = local_head
    out = tmp_path / "dpo-job"
    result = _submit(address, env, [
        "dpo", "--config", "jobs/dpo-tiny.yaml", "--model_name_or_path", tiny_model_dir,
        "--train_dataset", f"{demo_data_dir}/pref_train.jsonl", "--eval_dataset", f"{demo_data_dir}/pref_eval.jsonl",
        "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "4", "--save_steps", "null", "--logging_steps", "2",
        "--learner.num_actors", "1", "--reference.mode", "actor", "--logging.progress_bar", "false"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    # The driver attached to the head (RAY_ADDRESS from the job) instead of starting a Ray.
    assert "Started a local Ray instance" not in result.stdout
    marker = json.loads((out / "checkpoint-4" / "rayalign_complete.json").read_text())
    assert marker["step"] == 4
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4]
    assert any("eval_rewards/accuracies" in r for r in lines)
    assert (out / "model.safetensors").exists()


def test_ray_job_submit_reports_a_failing_job(local_head, tiny_model_dir, demo_data_dir, tmp_path):
    address, env = local_head
    result = _submit(address, env, [
        "dpo", "--config", "jobs/dpo-tiny.yaml", "--model_name_or_path", tiny_model_dir,
        "--train_dataset", f"{demo_data_dir}/pref_train.jsonl", "--output_dir", str(tmp_path / "bad"),
        "--beta", "-1"], timeout=300)
    assert result.returncode != 0
    assert "beta" in result.stdout + result.stderr
    assert not (tmp_path / "bad").exists()  # rejected before anything was written
