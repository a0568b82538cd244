"""Weak scaling on this machine: 1 vs 2 learners (per-learner batch fixed) and 1 vs 2 rollout
actors (prompts per rollout actor fixed), with the step parts the cost model in
docs/scaling.md is fitted to.

    python benchmarks/bench_scaling.py [--steps 20]

Offline DPO: the 16M-parameter scale model (`scale.build_model`), its long-tailed pairs,
max_length 384, 4 pairs per learner per step, reference mode none (the learner's own scaling),
learners of 1 CPU (1 torch thread) each, gloo all-reduce between them; 2 learners twice: with
each micro-batch's pairs dealt across them by tokens (`learner.balance_tokens`, the default) and
as the stream split them. Step time is the
driver's per-step hook (`runner.run(..., on_step=)`), median over the steps after the first two.
The gradient all-reduce alone is timed too: two gloo processes all-reduce a float32 tensor of
the model's parameter count, as the learners' DeepSpeed engines do every step.

Online DPO: the tiny demo model, HF rollouts (`rollout.backend=hf`), 8 prompts per rollout
actor per step, 1 learner; generation, scoring, training and weight-push seconds are the
driver's `timing/*` / `sync/*` step metrics (medians after the first two steps).

Writes benchmarks/bench_scaling.json. One process, one job after another: never beside
another benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[2:] if len(values) > 3 else values)


def offline(model: Path, data: Path, learners: int, steps: int, out: str, balance: bool = True) -> dict:
    from rayalign.config import DPOConfig, load_config
    from rayalign.drivers import offline as offline_job, runner

    cfg = load_config(DPOConfig, None, {
        "model_name_or_path": str(model), "train_dataset": str(data), "output_dir": out, "max_steps": steps,
        "per_device_train_batch_size": 4, "max_length": 384, "gradient_checkpointing": False, "seed": 0,
        "reference": {"mode": "none"}, "save_strategy": "no", "logging_steps": 1,
        "logging": {"report_to": [], "progress_bar": False},
        "learner": {"num_actors": learners, "num_cpus_per_actor": 1, "balance_tokens": balance}})
    times: list[float] = []
    imbalance: dict[str, list[float]] = {"dealt": [], "as_split": []}

    def on_step(record) -> None:
        times.append(record.finished - record.started)
        m = record.result.metrics
        if "perf/rank_tokens_imbalance" in m:
            imbalance["dealt"].append(m["perf/rank_tokens_imbalance"])
            imbalance["as_split"].append(m["perf/rank_tokens_imbalance_unbalanced"])

    runner.run(offline_job.job_for(cfg), on_step=on_step)
    step = median_after_warmup(times)
    return {"learners": learners, "balance_tokens": balance, "pairs_per_step": 4 * learners, "step_s": step,
            "pairs_per_s": 4 * learners / step, "step_times": times,
            **{f"rank_tokens_imbalance_{k}": statistics.mean(v) for k, v in imbalance.items() if v}}


def _allreduce_worker(rank: int, numel: int, reps: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.ones(numel)
    dist.all_reduce(x)
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def allreduce_seconds(numel: int, reps: int = 5) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, numel, reps, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    value = q.get(timeout=600)
    for p in procs:
        p.join()
    return value


def online(model: str, prompts: str, rollouts: int, steps: int, out: str) -> dict:
    import rayalign

    records: list[dict] = []
    walls: list[float] = []

    def on_step(record) -> None:
        records.append(dict(record.result.metrics))
        walls.append(record.finished - record.started)

    per_step = 8 * rollouts
    rayalign.train_online_dpo({
        "model_name_or_path": model, "train_dataset": prompts, "output_dir": out, "gradient_checkpointing": False,
        "max_steps": steps, "per_device_train_batch_size": per_step, "learning_rate": 5e-5, "max_length": 64,
        "max_new_tokens": 16, "temperature": 0.9, "top_k": 0, "seed": 0, "logging_steps": 1,
        "reward_funcs": ["rayalign.demo.task:demo_reward"], "save_strategy": "no",
        "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
        "reference": {"mode": "actor", "num_actors": 1, "num_cpus_per_actor": 0.5},
        "rollout": {"backend": "hf", "num_actors": rollouts, "num_cpus_per_actor": 1},
    }, on_step=on_step)
    part = {k: median_after_warmup([r.get(key, 0.0) for r in records]) for k, key in (
        ("generate_s", "timing/generate_s"), ("score_s", "timing/score_s"), ("train_s", "timing/train_s"),
        ("weight_push_s", "sync/weight_sync_s"))}
    step = median_after_warmup(walls)
    return {"rollout_actors": rollouts, "prompts_per_step": per_step, "step_s": step,
            "completions_per_s": 2 * per_step / step, **part, "other_s": step - sum(part.values())}


def one_job(kind: str, n: int, steps: int, work: Path) -> dict:
    """One job in a fresh process (each starts a Ray sized for its own actors)."""
    import subprocess

    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import bench_scaling as b; from pathlib import Path; "
            f"print('RESULT', json.dumps(b.run_job({kind!r}, {n}, {steps}, Path({str(work)!r}))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} x{n}: {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_job(kind: str, n: int, steps: int, work: Path) -> dict:
    out = tempfile.mkdtemp(prefix=f"{kind}-{n}-", dir=work)
    if kind.startswith("offline"):  # offline-split: learner.balance_tokens off
        return offline(work / "scale-model", work / "pairs.parquet", n, steps, out, balance=kind == "offline")
    return online(f"{work}/tiny", f"{work}/demo-data/prompts_train.jsonl", n, steps, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/rayalign-bench-scaling")
    p.add_argument("--parts", nargs="+", default=["offline", "online"])
    a = p.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    import scale
    from rayalign.demo.task import build_demo_model, write_demo_data

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "scale-model"
    if not (model / "config.json").exists():
        scale.build_model(model)
    pairs = work / "pairs.parquet"
    if not pairs.exists():
        src = scale.write_data(work / "gen", n_pairs=400, n_prompts=1)[0]
        pq.write_table(pa.Table.from_pylist([json.loads(x) for x in src.read_text().splitlines()]), pairs)
    build_demo_model(f"{work}/tiny")
    write_demo_data(f"{work}/demo-data")
    numel = scale.num_params(model)

    path = HERE / "bench_scaling.json"  # a run of some --parts keeps the other parts' results
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "params": numel})
    if "offline" in a.parts:
        result["offline"] = [one_job(kind, n, a.steps, work) for kind, n in
                             (("offline", 1), ("offline", 2), ("offline-split", 2))]
        result["allreduce_s"] = allreduce_seconds(numel)
        result["allreduce_bytes"] = 4 * numel
    if "online" in a.parts:
        result["online"] = [one_job("online", r, a.steps, work) for r in (1, 2)]
    print(json.dumps(result, indent=2))
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
