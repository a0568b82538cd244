"""rayalign vs TRL 1.16 RewardTrainer: same tiny model, data, batch and steps, one run.

    cd benchmarks && ../.venv/bin/python bench_reward.py --steps 200 --batch 8
"""

from __future__ import annotations

import json
import os
import platform


from common import setup


def run_trl(model_dir, data, out, steps, batch) -> float:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rows = [json.loads(x) for x in open(data)]
    args = RewardConfig(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=batch,
                        max_steps=steps, learning_rate=1e-3, max_length=64, logging_steps=50, save_strategy="no",
                        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer.train().metrics["train_samples_per_second"]


def run_rayalign(model_dir, data, out, steps, batch) -> float:
    import rayalign

    result = rayalign.train_reward({
        "model_name_or_path": model_dir, "train_dataset": data, "output_dir": out, "gradient_checkpointing": False,
        "max_steps": steps,
        "per_device_train_batch_size": batch, "learning_rate": 1e-3, "max_length": 64, "logging_steps": 50,
        "seed": 0, "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1}})
    return result["metrics"]["train_samples_per_second"]


def main() -> None:
    a, tmp, model_dir, data = setup("bench-reward-")
    trl = run_trl(model_dir, data, f"{tmp}/trl", a.steps, a.batch)
    ours = run_rayalign(model_dir, data, f"{tmp}/ours", a.steps, a.batch)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": a.steps,
                      "batch": a.batch, "samples_per_second": {"trl": round(trl, 1), "rayalign": round(ours, 1)},
                      "ratio": round(ours / trl, 2)}, indent=2))


if __name__ == "__main__":
    main()
