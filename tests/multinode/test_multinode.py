"""Runs across several Ray nodes on this machine (a real `ray.cluster_utils.Cluster`, in a
subprocess so its Ray is not the suite's): training data as a URI of Parquet shards tokenized
on the worker nodes, a bad row in a later shard failing the run by file/row/field, learners on
two nodes, the driver on a node with no learner, a learner's node removed mid-run and the run
recovering from its last checkpoint; the reference (actor or precompute stage) and the rollout
actors on a third node chosen by custom resources, with checkpoints, metrics and the reference
cache under a file:// URI; and the shared-storage check's decision (which node cannot see the
run dir)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rayalign.storage import StorageError, check_shared

JOB = Path(__file__).with_name("job.py")
ROOT = JOB.parent.parent.parent


def _shards(demo_data_dir, root: Path, bad_row: tuple[int, int] | None = None) -> str:
    """pref_train.jsonl as 4 Parquet shards under `root`, as a file:// URI; `bad_row` (shard,
    row): that row's rejected equals its chosen."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(f"{demo_data_dir}/pref_train.jsonl")]
    root.mkdir(parents=True)
    per = -(-len(rows) // 4)
    for k in range(4):
        part = [dict(r) for r in rows[k * per:(k + 1) * per]]
        if bad_row and bad_row[0] == k:
            part[bad_row[1]]["rejected"] = part[bad_row[1]]["chosen"]
        pq.write_table(pa.Table.from_pylist(part), root / f"part-{k:05d}.parquet")
    return f"file://{root}"


def _run(tiny_model_dir, demo_data_dir, out, *flags) -> dict:
    # RAYALIGN_LOCAL_TOKENIZE_BYTES=0: the demo data is small enough for the driver; tokenize on the workers
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", "RAYALIGN_LOCAL_TOKENIZE_BYTES": "0"}
    env.pop("RAY_ADDRESS", None)
    data = _shards(demo_data_dir, Path(f"{str(out).removeprefix('file://')}-data"))
    proc = subprocess.run([sys.executable, str(JOB), tiny_model_dir, data, str(out),
                           *flags], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "eval_loss" not in r}


@pytest.mark.slow
def test_learners_span_nodes_and_a_lost_node_is_recovered(tiny_model_dir, demo_data_dir, tmp_path):
    bad = _shards(demo_data_dir, tmp_path / "bad-data", bad_row=(2, 150))  # past the 64-row sample
    clean = _run(tiny_model_dir, demo_data_dir, tmp_path / "clean", "--bad-data", bad)
    assert re.search(r"part-00002.parquet row 150, field 'rejected': identical to chosen", clean["bad_data_error"])
    failed = tmp_path / "clean-bad"  # the failed run wrote no metrics and no checkpoint
    assert not list(failed.glob("checkpoint-*")) and not (failed / "metrics.jsonl").exists()
    before = clean["placements"][0]
    assert len(set(before)) == 2 and clean["head"] not in before  # two nodes, none the driver's
    assert clean["reference_nodes"] == [clean["aux"]] and clean["aux"] not in before  # reference.resources
    assert clean["tokenize_nodes"] and clean["head"] not in clean["tokenize_nodes"]  # shards tokenized off the driver
    assert clean["checkpoint"].endswith("checkpoint-8")

    lost = _run(tiny_model_dir, demo_data_dir, tmp_path / "lost", "--remove-node")
    assert lost["removed"] in lost["placements"][0] and lost["removed"] not in lost["placements"][-1]
    assert len(set(lost["placements"][-1])) == 2
    assert lost["checkpoint"].endswith("checkpoint-8")
    rows = [json.loads(line) for line in open(tmp_path / "lost" / "metrics.jsonl")]
    assert any(r.get("recoveries") == 1 for r in rows)
    want, got = _losses(tmp_path / "clean"), _losses(tmp_path / "lost")
    assert sorted(got) == list(range(1, 9))
    for step in want:  # restored from checkpoint-2: the same run, step for step
        assert got[step] == pytest.approx(want[step], rel=1e-3, abs=1e-4), step


@pytest.mark.slow
def test_reference_and_rollouts_on_their_own_node_with_run_files_on_a_uri(tiny_model_dir, demo_data_dir, tmp_path):
    """Precompute DPO (the Ray Data reference stage pinned to the aux node) and online DPO (its
    reference and HF rollout actors there), output and reference cache under a file:// URI."""
    root = tmp_path / "shared"
    seen = _run(tiny_model_dir, demo_data_dir, f"file://{root}", "--roles", f"{demo_data_dir}/prompts_train.jsonl")
    aux, head = seen["aux"], seen["head"]
    pre, on = seen["precompute"], seen["online"]
    assert pre["stage_nodes"] == [aux]
    for run in (pre, on):  # two learners on two learner_node nodes: not the aux node, not the driver's
        assert len(run["learner_nodes"]) == 2 and aux not in run["learner_nodes"] and head not in run["learner_nodes"]
    assert on["rollout_nodes"] == [aux] and on["reference_nodes"] == [aux]
    assert pre["checkpoint"] == f"file://{root}/precompute/checkpoint-3"
    assert on["checkpoint"] == f"file://{root}/online/checkpoint-3"
    for run in ("precompute", "online"):  # what the URI holds: the checkpoint, metrics, the run files
        assert (root / run / "checkpoint-3" / "model.safetensors").is_file()
        steps = [json.loads(line)["step"] for line in open(root / run / "metrics.jsonl") if '"loss"' in line]
        assert steps[-1] == 3, steps
        assert (root / run / "trainer_state.json").is_file()
    caches = list((root / "ref-cache").rglob("*"))  # the stage wrote its cache to the URI
    assert any(p.is_file() for p in caches), caches


def test_shared_storage_check_names_the_node_that_cannot_see_the_run_dir(tmp_path):
    """One machine has no node-local disks, so which node sees the probe is given here."""
    nodes = [{"NodeID": "a", "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.2"}]
    check_shared(str(tmp_path / "run"), nodes=nodes, sees=lambda node, probe: os.path.exists(probe))
    with pytest.raises(StorageError, match=r"output_dir: .*not visible from Ray node\(s\) 10.0.0.2"):
        check_shared(str(tmp_path / "run"), nodes=nodes, sees=lambda node, probe: node["NodeID"] == "a")
    assert not list(tmp_path.glob(".rayalign-probe-*"))  # the probe is removed either way
    check_shared("s3://bucket/run", nodes=nodes, sees=lambda node, probe: False)  # URIs: shared by design
