"""Shared set-up of the benchmarks: arguments, the tiny model and the demo data."""

from __future__ import annotations

import argparse
import tempfile

import torch


def setup(prefix: str) -> tuple[argparse.Namespace, str, str, str]:
    """Parse --steps/--batch, pin 2 threads, build the tiny model and the demo preference
    data in a fresh temp dir; returns (args, temp dir, model dir, train file)."""
    from rayalign.demo.task import write_demo_data
    from rayalign.models.tiny import build_tiny_model

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix=prefix)
    model_dir = str(build_tiny_model(f"{tmp}/model"))
    data = str(write_demo_data(f"{tmp}/data") / "pref_train.jsonl")
    return args, tmp, model_dir, data
