"""Time to first step and peak driver memory of an offline DPO job on sharded data, as the
dataset grows 10x (issue 17: the driver must not hold the dataset).

    python benchmarks/bench_data.py [--rows 20000 200000] [--shards 16] [--code DIR ...]

Data: the realistic-scale generator's long-tailed hh-rlhf-style pairs (`scale.write_data`,
chosen p50 ~120 tokens with the 8k-vocab tokenizer), written as `--shards` Parquet files per
size. Each (code, size) runs in a fresh process: a DPO job (the 16M-parameter scale model,
reference mode none, max_steps 1, max_length 384) on the shard directory; the process records
the seconds from the job's construction to the end of its first step and its own peak RSS
(the driver's, `ru_maxrss`; Ray's workers are other processes). `--code` runs the job with
another checkout's `rayalign` (e.g. a git worktree of the commit before the streaming data
path) for a before/after comparison in the same run. Writes benchmarks/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build(workdir: Path, rows: list[int], shards: int) -> tuple[Path, dict[int, Path]]:
    """The scale model and, per size, a directory of Parquet shards (kept between runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    import scale

    model = workdir / "model"
    if not (model / "config.json").exists():
        scale.build_model(model)
    dirs = {}
    for n in rows:
        d = workdir / f"pairs-{n}"
        if not (d / f"part-{shards - 1:05d}.parquet").exists():
            src = scale.write_data(workdir / f"gen-{n}", n_pairs=n, n_prompts=1)[0]
            lines = src.read_text().splitlines()
            d.mkdir(parents=True, exist_ok=True)
            per = -(-len(lines) // shards)
            for k in range(shards):
                part = [json.loads(x) for x in lines[k * per:(k + 1) * per]]
                pq.write_table(pa.Table.from_pylist(part), d / f"part-{k:05d}.parquet")
            src.unlink()
        dirs[n] = d
    return model, dirs


CHILD = r"""
import json, resource, sys, time
started = time.perf_counter()
from rayalign.config import DPOConfig, load_config
from rayalign.drivers import offline, runner
model, data, out = sys.argv[1:4]
cfg = load_config(DPOConfig, None, {
    "model_name_or_path": model, "train_dataset": data, "output_dir": out, "max_steps": 1,
    "per_device_train_batch_size": 4, "max_length": 384, "gradient_checkpointing": False,
    "reference": {"mode": "none"}, "save_strategy": "no",
    "logging": {"report_to": [], "progress_bar": False}})
first = {}
def on_step(record):
    first.setdefault("s", time.perf_counter() - started)
runner.run(offline.job_for(cfg), on_step=on_step)
print(json.dumps({"first_step_s": first["s"],
                  "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_one(code: Path, model: Path, data: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "RAYALIGN_QUIET": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), str(out)], capture_output=True,
                          text=True, env=env, cwd=str(code), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{code} on {data}: {proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--code", nargs="*", default=[], help="other checkouts to compare (their rayalign runs the job)")
    p.add_argument("--workdir", default="/tmp/rayalign-bench-data")
    a = p.parse_args()
    workdir = Path(a.workdir)
    model, dirs = build(workdir, a.rows, a.shards)
    results = []
    for code in [ROOT, *map(Path, a.code)]:
        for n in a.rows:
            r = run_one(code, model, dirs[n], workdir / f"out-{code.name}-{n}-{time.time_ns()}")
            row = {"code": str(code), "rows": n, "shards": a.shards, **r}
            print(json.dumps(row), flush=True)
            results.append(row)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    (HERE / "bench_data.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
