"""benchmarks/gpu/run.sh cannot rot: its CPU dry run (tiny shapes, the same code path as on a
GPU where one is not needed) runs every part and writes a JSON summary without errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": os.path.join(os.path.dirname(os.sys.executable),
                                                                         "python")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["dry_run"] and summary["machine"]["torch"]
    errors = {k: v["error"] for k, v in summary.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    assert summary["dpo_step"]["tokens_per_s"] > 0 and 0 < summary["dpo_step"]["mfu_vs_measured_matmul"] < 1
    assert summary["dpo_step"]["reference_tokens_per_s"] > 0
    assert summary["rollout"]["generated_tokens"] > 0
    assert summary["dpo_job"]["train_samples_per_second"] > 0
    assert summary["online_object_store"]["pushes"] >= 2 and summary["online_object_store"]["weight_push_s_median"] > 0
    assert "skipped" in summary["online_nccl"]
    assert summary["tests"]["returncode"] in (0, 5)  # 5: no gpu-marked test collected
