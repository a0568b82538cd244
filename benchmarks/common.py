"""Shared set-up of the benchmarks: arguments, the tiny model and the demo data, and the
machine's matmul speed (recorded with each run)."""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Callable

import torch


def setup(prefix: str, steps: int = 200, batch: int = 8,
          add_args: Callable[[argparse.ArgumentParser], None] | None = None
          ) -> tuple[argparse.Namespace, str, str, str]:
    """Parse --steps/--batch (and whatever `add_args` adds), pin 2 threads, build the tiny
    model and the demo data (preference, SFT and prompt files side by side) in a fresh temp
    dir; returns (args, temp dir, model dir, preference train file)."""
    from rayalign.demo.task import build_demo_model, write_demo_data

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    if add_args is not None:
        add_args(p)
    args = p.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix=prefix)
    model_dir = str(build_demo_model(f"{tmp}/model"))
    data = str(write_demo_data(f"{tmp}/data") / "pref_train.jsonl")
    return args, tmp, model_dir, data


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
