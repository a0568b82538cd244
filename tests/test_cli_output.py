"""What a job prints: by default rayalign's progress, eval and summary lines, and no library
output (Ray actors' logs, vLLM / DeepSpeed / transformers warnings), which goes to a log file kept
in <output_dir>/logs/; `--verbose` prints the libraries' output as they do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dpo(tiny_model_dir, demo_data_dir, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rayalign", "dpo", "--model_name_or_path", tiny_model_dir,
           "--train_dataset", f"{demo_data_dir}/pref_train.jsonl", "--eval_dataset", f"{demo_data_dir}/pref_eval.jsonl",
           "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "2",
           "--eval_steps", "4", "--max_length", "64", "--ray.num_cpus", "3", *extra]
    env = {**os.environ, "RAYALIGN_LOG_DIR": str(out.parent / "logs")}
    for key in ("RAY_ADDRESS", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS", "RAYALIGN_QUIET"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_a_job_prints_its_own_lines_and_keeps_library_output_in_a_log_file(tiny_model_dir, demo_data_dir, tmp_path):
    quiet = _dpo(tiny_model_dir, demo_data_dir, tmp_path / "quiet" / "run")
    lines = quiet.stderr.splitlines()
    assert any("rayalign dpo step 4/4" in line for line in lines), quiet.stderr
    assert any("eval at step 4" in line for line in lines)
    assert not [line for line in lines if "pid=" in line], quiet.stderr  # no actor output streamed
    assert json.loads(quiet.stdout)["checkpoint"].endswith("checkpoint-4")
    kept = list((tmp_path / "quiet" / "run" / "logs").glob("dpo-*.log"))
    assert len(kept) == 1
    verbose = _dpo(tiny_model_dir, demo_data_dir, tmp_path / "verbose" / "run", "--verbose")
    assert [line for line in verbose.stderr.splitlines() if "pid=" in line]  # the actors' own output
    assert len(quiet.stderr.splitlines()) < len(verbose.stderr.splitlines())


def test_a_local_ray_without_a_cpu_beside_the_actors_is_refused(monkeypatch):
    """Learner and reference actor holding every CPU of the local Ray: Ray Data's tasks would
    never run and the first step would wait forever; the job is refused before Ray starts."""
    import ray

    from rayalign.config import ConfigError, DPOConfig, RayConfig
    from rayalign.drivers.common import local_num_cpus

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = DPOConfig(model_name_or_path="m", train_dataset="d.jsonl", ray=RayConfig(num_cpus=2))
    with pytest.raises(ConfigError, match=r"ray.num_cpus: 2 leaves no CPU .* set ray.num_cpus >= 3"):
        local_num_cpus(cfg)
    assert local_num_cpus(DPOConfig(model_name_or_path="m", train_dataset="d.jsonl", ray=RayConfig(num_cpus=3))) == 3
