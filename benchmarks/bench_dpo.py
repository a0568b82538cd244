"""rayalign vs TRL 1.16 DPOTrainer: same tiny model, data, batch size and steps, one run.

    cd benchmarks && ../.venv/bin/python bench_dpo.py --steps 200 --batch 8

Prints samples/s of TRL (live reference, and precompute_ref_log_probs) and of rayalign with
one learner (reference actor = live, and reference.mode=precompute), plus the machine's
matmul throughput measured in the same run. Results go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import json
import os
import platform

import torch

from common import matmul_gflops, setup


def run_trl(model_dir, data, out, steps, batch, precompute) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in open(data)]
    args = DPOConfig(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=batch,
                     max_steps=steps, learning_rate=5e-4, max_length=64, logging_steps=50, save_strategy="no",
                     precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0,
                     disable_tqdm=True)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_dir))
    result = trainer.train()
    return result.metrics["train_samples_per_second"]


def run_rayalign(model_dir, data, out, steps, batch, mode) -> float:
    import rayalign

    result = rayalign.train_dpo({
        "model_name_or_path": model_dir, "train_dataset": data, "output_dir": out, "gradient_checkpointing": False,
        "max_steps": steps,
        "per_device_train_batch_size": batch, "learning_rate": 5e-4, "max_length": 64, "logging_steps": 50,
        "seed": 0, "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
        "reference": {"mode": mode, "num_actors": 1, "num_cpus_per_actor": 1, "cache_dir": f"{out}/../cache"},
    })
    return result["metrics"]["train_samples_per_second"]


def main() -> None:
    a, tmp, model_dir, data = setup("bench-dpo-")
    gflops = matmul_gflops()
    res = {
        "trl_live": run_trl(model_dir, data, f"{tmp}/trl-live", a.steps, a.batch, False),
        "trl_precompute": run_trl(model_dir, data, f"{tmp}/trl-pre", a.steps, a.batch, True),
        "rayalign_live": run_rayalign(model_dir, data, f"{tmp}/ra-live", a.steps, a.batch, "actor"),
        "rayalign_precompute": run_rayalign(model_dir, data, f"{tmp}/ra-pre", a.steps, a.batch, "precompute"),
        "rayalign_precompute_cached": run_rayalign(model_dir, data, f"{tmp}/ra-pre2", a.steps, a.batch,
                                                   "precompute"),
    }
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "torch_threads": torch.get_num_threads(), "matmul_gflops_1024": round(gflops, 1),
                      "steps": a.steps, "batch": a.batch,
                      "samples_per_second": {k: round(v, 1) for k, v in res.items()},
                      "ratio_live": round(res["rayalign_live"] / res["trl_live"], 2),
                      "ratio_precompute": round(res["rayalign_precompute"] / res["trl_precompute"], 2),
                      "ratio_precompute_cached": round(res["rayalign_precompute_cached"] / res["trl_precompute"], 2)},
                     indent=2))


if __name__ == "__main__":
    main()
