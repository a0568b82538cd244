"""The embedded default, end to end on a local Ray: tiny model -> SFT -> reward model -> DPO.

    rayalign demo --output_dir outputs/demo          (what `make demo` runs)

Builds the tiny model and the demo data, fine-tunes with SFT, trains a Bradley–Terry reward
model from the SFT model, then runs offline DPO from the SFT model, and prints the task's correctness (greedy answers checked by the program)
before and after DPO, with the final eval metrics. Everything lands in `output_dir`:
`tiny-model/`, `data/`, `sft/`, `reward/`, `dpo/` (checkpoints, metrics.jsonl, TensorBoard, PNG plots)
and `summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray

from rayalign.config import DPOConfig, RewardConfig, SFTConfig, from_dict


@ray.remote(num_cpus=1)
def _correctness_task(model_dir: str, prompts_file: str, max_new_tokens: int, limit: int | None) -> dict:
    return measure_correctness(model_dir, prompts_file, max_new_tokens, limit)


def measure_correctness(model_dir: str, prompts_file: str, max_new_tokens: int = 16,
                        limit: int | None = None) -> dict:
    """Greedy answers of `model_dir` to the prompts, scored by the demo task's checker."""
    import torch

    from rayalign.data import load_prompts, prompt_text_and_ids
    from rayalign.demo.task import correctness
    from rayalign.models.generate import generate_texts
    from rayalign.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    prompts = load_prompts(prompts_file)[:limit]
    ids = [prompt_text_and_ids(p, tokenizer)[1] for p in prompts]
    completions = generate_texts(model, tokenizer, ids, max_new_tokens)
    return {"correctness": correctness(prompts, completions), "num_prompts": len(prompts),
            "examples": [{"prompt": p, "completion": c} for p, c in list(zip(prompts, completions))[:5]]}


def run_demo(output_dir: str = "outputs/demo", *, sft_steps: int | None = None, dpo_steps: int | None = None,
             reward_steps: int | None = None, num_learners: int = 2, seed: int = 0) -> dict:
    """Run the whole embedded pipeline; returns (and writes) the summary."""
    from rayalign.actors.group import ensure_ray
    from rayalign.demo.task import write_demo_data
    from rayalign.drivers.offline import train
    from rayalign.models.tiny import build_tiny_model

    t_start = time.time()
    out = Path(output_dir)
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, seed=seed)
    data = write_demo_data(out / "data", seed=seed)
    ensure_ray(None, max(os.cpu_count() or 1, num_learners + 2))
    timings = {}

    def correctness(path: Path) -> dict:
        return ray.get(_correctness_task.remote(str(path), str(data / "prompts_eval.jsonl"), 16, None))

    sft_cfg = from_dict(SFTConfig, {
        "model_name_or_path": str(model_dir), "train_dataset": str(data / "sft_train.jsonl"),
        "eval_dataset": str(data / "sft_eval.jsonl"), "output_dir": str(out / "sft"),
        "max_steps": sft_steps or 400, "per_device_train_batch_size": 32, "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 25, "max_length": 64,
        "seed": seed, "save_total_limit": 1,
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
    })
    t0 = time.time()
    sft = train(sft_cfg)
    timings["sft_s"] = time.time() - t0
    before = correctness(out / "sft")
    print(f"\n== correctness after SFT: {before['correctness']:.3f} on {before['num_prompts']} eval prompts")

    reward_cfg = from_dict(RewardConfig, {
        "model_name_or_path": str(out / "sft"), "train_dataset": str(data / "pref_train.jsonl"),
        "eval_dataset": str(data / "pref_eval.jsonl"), "output_dir": str(out / "reward"),
        "max_steps": reward_steps or 300, "per_device_train_batch_size": 16, "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine", "logging_steps": 25, "eval_steps": 100, "max_length": 64, "seed": seed,
        "save_total_limit": 1, "learner": {"num_actors": num_learners, "num_cpus_per_actor": 1, "zero_stage": 2},
    })
    t0 = time.time()
    reward = train(reward_cfg)
    timings["reward_s"] = time.time() - t0
    print(f"\n== reward model eval accuracy: {reward['metrics']['eval_accuracy']:.3f}")

    dpo_cfg = from_dict(DPOConfig, {
        "model_name_or_path": str(out / "sft"), "train_dataset": str(data / "pref_train.jsonl"),
        "eval_dataset": str(data / "pref_eval.jsonl"), "output_dir": str(out / "dpo"),
        "max_steps": dpo_steps or 120, "per_device_train_batch_size": 16, "learning_rate": 5e-4,
        # RPO (DPO + NLL on chosen) keeps the chosen answers' likelihood from sliding down
        # while the margin grows, which plain sigmoid DPO does on this task.
        "beta": 0.1, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "logging_steps": 10, "eval_steps": 60, "save_steps": 60,
        "save_total_limit": 2, "max_length": 64, "seed": seed,
        "learner": {"num_actors": num_learners, "num_cpus_per_actor": 1, "zero_stage": 2},
        "reference": {"mode": "precompute", "num_actors": 1, "num_cpus_per_actor": 1},
    })
    t0 = time.time()
    dpo = train(dpo_cfg)
    timings["dpo_s"] = time.time() - t0
    after = correctness(out / "dpo")
    timings["total_s"] = time.time() - t_start

    summary = {
        "correctness": {"sft": before["correctness"], "dpo": after["correctness"]},
        "num_eval_prompts": after["num_prompts"],
        "sft_final": {k: v for k, v in sft["metrics"].items() if k.startswith("eval_") or k == "loss"},
        "reward_final": {k: v for k, v in reward["metrics"].items() if k.startswith("eval_")},
        "dpo_final": {k: v for k, v in dpo["metrics"].items()
                      if k.startswith(("eval_", "rewards/")) or k in ("loss", "train_samples_per_second")},
        "examples_after_dpo": after["examples"], "timings": timings,
        "models": {"sft": str(out / "sft"), "reward": str(out / "reward"), "dpo": str(out / "dpo")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== rayalign demo (reverse the letters)")
    print(f"   correctness  SFT {before['correctness']:.3f}  ->  DPO {after['correctness']:.3f}")
    for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if k in dpo["metrics"]:
            print(f"   DPO {k:<24} {dpo['metrics'][k]:.4f}")
    print(f"   reward model eval accuracy {reward['metrics']['eval_accuracy']:.3f}")
    print(f"   time: SFT {timings['sft_s']:.0f}s, reward {timings['reward_s']:.0f}s, DPO {timings['dpo_s']:.0f}s, "
          f"total {timings['total_s']:.0f}s")
    print(f"   outputs: {out}/ (summary.json, sft/, dpo/ with metrics.jsonl and metrics.png)")
    return summary
