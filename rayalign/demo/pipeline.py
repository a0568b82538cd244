"""The embedded default, end to end on a local Ray: tiny model -> SFT -> reward model ->
offline DPO -> online DPO -> eval.

    rayalign demo --output_dir outputs/demo          (what `make demo` runs)

Builds the demo's small model (4 layers of width 128) and the demo data, fine-tunes with SFT on
sloppy demonstrations (most answers to long inputs leave off the last letter:
`rayalign/demo/task.py`), trains a Bradley–Terry reward model from the SFT model, then from the
SFT model runs offline DPO (on the bundled pairs, whose rejected answers are other mistakes)
and online DPO (the policy's own samples ranked by the task's rule-based reward) for the same
number of steps, loss, beta and learning rate, and ends with the eval job on the held-out
problems: SFT vs DPO vs online DPO, greedy answers scored by the task's checker (correctness)
and by the reward model (mean score), with 95% intervals. (No judge win rate against the
reference answers: a correct answer can only tie with the reference, so that column mostly
counts ties.) Everything lands in `output_dir`: `small-model/`, `data/`, `sft/`, `reward/`, `dpo/`,
`online-dpo/` (checkpoints, metrics.jsonl, TensorBoard, PNG plots), `eval/` (completions.jsonl,
summary.json, metrics.png) and `summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rayalign.config import DPOConfig, EvalConfig, OnlineDPOConfig, RewardConfig, SFTConfig, from_dict


def sft_config(model_dir, data_dir, output_dir, *, steps: int = 400, seed: int = 0) -> SFTConfig:
    """The demo's SFT stage: 400 steps of 32 on the sloppy demonstrations."""
    return from_dict(SFTConfig, {
        "model_name_or_path": str(model_dir), "train_dataset": f"{data_dir}/sft_train_sloppy.jsonl",
        "eval_dataset": f"{data_dir}/sft_eval.jsonl", "output_dir": str(output_dir), "gradient_checkpointing": False,
        "overwrite_output_dir": True,
        "max_steps": steps, "per_device_train_batch_size": 32, "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 25, "max_length": 64,
        "seed": seed, "save_total_limit": 1,
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
    })


def reward_config(sft_dir, data_dir, output_dir, *, steps: int = 150, num_learners: int = 2,
                  seed: int = 0) -> RewardConfig:
    """The demo's reward model: Bradley-Terry from the SFT model, 128 pairs a step. At 32 pairs a
    step it stalls below 0.9 eval accuracy, train accuracy too; at 128 it passes 0.9 by step 100."""
    return from_dict(RewardConfig, {
        "model_name_or_path": str(sft_dir), "train_dataset": f"{data_dir}/pref_train.jsonl",
        "eval_dataset": f"{data_dir}/pref_eval.jsonl", "output_dir": str(output_dir), "gradient_checkpointing": False,
        "overwrite_output_dir": True,
        "max_steps": steps, "per_device_train_batch_size": 128 // num_learners, "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 25, "eval_steps": 50, "max_length": 64,
        "seed": seed, "save_total_limit": 1,
        "learner": {"num_actors": num_learners, "num_cpus_per_actor": 1, "zero_stage": 2},
    })


def dpo_config(sft_dir, data_dir, output_dir, *, steps: int, num_learners: int = 2, seed: int = 0) -> DPOConfig:
    """The demo's offline DPO: 32 bundled pairs a step, with the online stage's loss, beta and
    learning rate (5e-4, linear decay: TRL's default; at a constant rate the held-out correctness
    of both swings by up to 0.2 between checkpoints), so the two differ only in where their pairs
    come from."""
    return from_dict(DPOConfig, {
        "model_name_or_path": str(sft_dir), "train_dataset": f"{data_dir}/pref_train.jsonl",
        "eval_dataset": f"{data_dir}/pref_eval.jsonl", "output_dir": str(output_dir), "gradient_checkpointing": False,
        "overwrite_output_dir": True,
        "max_steps": steps, "per_device_train_batch_size": 32 // num_learners, "learning_rate": 5e-4,
        "lr_scheduler_type": "linear", "beta": 0.1, "loss_type": "sigmoid", "logging_steps": 10,
        "eval_steps": 50, "save_steps": 100, "save_total_limit": 2, "max_length": 64, "seed": seed,
        "learner": {"num_actors": num_learners, "num_cpus_per_actor": 1, "zero_stage": 2},
        "reference": {"mode": "precompute", "num_actors": 1, "num_cpus_per_actor": 1},
    })


def online_dpo_config(sft_dir, data_dir, output_dir, *, steps: int, prompts_per_step: int = 32,
                      num_learners: int = 1, backend: str = "auto", seed: int = 0) -> OnlineDPOConfig:
    """The demo's online DPO: the SFT model samples two answers per prompt at temperature 1,
    the task's rule-based reward ranks them (a missing eos costs 1), sigmoid DPO against a live
    reference, with offline DPO's beta and learning rate schedule. The sloppy SFT model's sampled answers
    to long inputs keep their last letter ~40% of the time, so most of its pairs contrast exactly
    that mistake: the on-policy signal the offline pairs (other mistakes) lack."""
    return from_dict(OnlineDPOConfig, {
        "model_name_or_path": str(sft_dir), "train_dataset": f"{data_dir}/prompts_train.jsonl",
        "output_dir": str(output_dir), "gradient_checkpointing": False,
        "overwrite_output_dir": True, "max_steps": steps,
        "per_device_train_batch_size": max(1, prompts_per_step // num_learners), "learning_rate": 5e-4,
        "lr_scheduler_type": "linear", "beta": 0.1, "loss_type": "sigmoid", "max_length": 64,
        "max_new_tokens": 16, "temperature": 1.0, "reward_funcs": ["rayalign.demo.task:demo_reward"],
        "missing_eos_penalty": 1.0, "logging_steps": 10, "save_steps": steps, "save_total_limit": 1,
        "seed": seed, "logging": {"progress_bar": False},
        "learner": {"num_actors": num_learners, "num_cpus_per_actor": 0.5},
        "reference": {"mode": "actor", "num_cpus_per_actor": 0.5},
        "rollout": {"backend": backend, "num_actors": 1, "num_cpus_per_actor": 1},
    })


def eval_config(models: list[dict], data_dir, output_dir, reward_dir, backend: str = "auto",
                seed: int = 0) -> EvalConfig:
    """The demo's eval: greedy answers to the 200 held-out problems; the task's checker and the
    reward model's mean score."""
    return from_dict(EvalConfig, {
        "models": models, "eval_dataset": f"{data_dir}/sft_eval.jsonl", "output_dir": str(output_dir),
        "max_new_tokens": 16, "max_length": 64, "checker": "rayalign.demo.task:check_answers",
        "reward_model_path": str(reward_dir),
        "seed": seed, "rollout": {"backend": backend, "num_actors": 1, "num_cpus_per_actor": 1},
        "scoring": {"num_cpus_per_actor": 0.5}, "logging": {"progress_bar": False},
    })


def run_demo(output_dir: str = "outputs/demo", *, sft_steps: int | None = None, dpo_steps: int | None = None,
             reward_steps: int | None = None, num_learners: int = 2, seed: int = 0, backend: str = "auto") -> dict:
    """Run the whole embedded pipeline; returns (and writes) the summary."""
    from rayalign.actors.group import ensure_ray
    from rayalign.demo.task import DEMO_N_PREF, build_demo_model, write_demo_data
    from rayalign.drivers.evaluate import run_eval
    from rayalign.drivers.offline import train
    from rayalign.drivers.online import train_online

    t_start = time.time()
    out = Path(output_dir)
    model_dir = out / "small-model"
    if not (model_dir / "config.json").exists():
        build_demo_model(model_dir, seed=seed, size="small")
    data = write_demo_data(out / "data", seed=seed, n_pref=DEMO_N_PREF)
    ensure_ray(None, max(os.cpu_count() or 1, num_learners + 2))
    timings = {}

    sft_cfg = sft_config(model_dir, data, out / "sft", steps=sft_steps or 400, seed=seed)
    t0 = time.time()
    sft = train(sft_cfg)
    timings["sft_s"] = time.time() - t0

    reward_cfg = reward_config(out / "sft", data, out / "reward", steps=reward_steps or 150,
                               num_learners=num_learners, seed=seed)
    t0 = time.time()
    reward = train(reward_cfg)
    timings["reward_s"] = time.time() - t0
    print(f"\n== reward model eval accuracy: {reward['metrics']['eval_accuracy']:.3f}")

    steps = dpo_steps or 200
    dpo_cfg = dpo_config(out / "sft", data, out / "dpo", steps=steps, num_learners=num_learners, seed=seed)
    pairs_per_step = dpo_cfg.per_device_train_batch_size * num_learners  # online DPO takes as many
    t0 = time.time()
    dpo = train(dpo_cfg)
    timings["dpo_s"] = time.time() - t0

    # Online DPO: the same number of steps and pairs per step as offline DPO.
    online_cfg = online_dpo_config(out / "sft", data, out / "online-dpo", steps=steps,
                                   prompts_per_step=pairs_per_step, backend=backend, seed=seed)
    t0 = time.time()
    online = train_online(online_cfg)
    timings["online_dpo_s"] = time.time() - t0

    # The final checkpoint of each run (a run dir would expand to every checkpoint it kept).
    models = [{"name": "sft", "path": sft["checkpoint"]}, {"name": "dpo", "path": dpo["checkpoint"]},
              {"name": "online-dpo", "path": online["checkpoint"]}]
    t0 = time.time()
    evaluation = run_eval(eval_config(models, data, out / "eval", out / "reward", backend=backend, seed=seed))
    timings["eval_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    table = {m["name"]: _row(m) for m in evaluation["models"]}
    summary = {
        "steps": {"dpo": steps, "online_dpo": steps, "pairs_per_step": pairs_per_step},
        "correctness": {k: v["correctness"] for k, v in table.items()},
        "eval": table, "num_eval_prompts": evaluation["num_prompts"], "rollout_backend": online["backend"],
        "sft_final": {k: v for k, v in sft["metrics"].items() if k.startswith("eval_") or k == "loss"},
        "reward_final": {k: v for k, v in reward["metrics"].items() if k.startswith("eval_")},
        "dpo_final": {k: v for k, v in dpo["metrics"].items()
                      if k.startswith(("eval_", "rewards/")) or k in ("loss", "train_samples_per_second")},
        "online_dpo_final": {k: v for k, v in online["metrics"].items()
                             if k.startswith(("objective/", "rewards/", "val/")) or
                             k in ("loss", "train_samples_per_second")},
        "timings": timings,
        "models": {"sft": str(out / "sft"), "reward": str(out / "reward"), "dpo": str(out / "dpo"),
                   "online_dpo": str(out / "online-dpo"), "eval": str(out / "eval")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n== rayalign demo (reverse the letters): {evaluation['num_prompts']} held-out problems, "
          f"greedy; DPO and online DPO {steps} steps x {pairs_per_step} pairs from the SFT model")
    print(format_table(table))
    print(f"   reward model eval accuracy {reward['metrics']['eval_accuracy']:.3f}; online DPO rollouts on "
          f"{online['backend']}, objective/scores {online['metrics'].get('objective/scores', float('nan')):.3f} "
          f"at the last step")
    print("   time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items()))
    print(f"   outputs: {out}/ (summary.json; eval/ with completions.jsonl, summary.json, metrics.png; "
          "sft/, reward/, dpo/, online-dpo/ with metrics.jsonl and metrics.png)")
    return summary


def _row(model: dict) -> dict:
    """One eval summary row: correctness and reward, each with its 95% interval."""
    checker, reward = (model.get(k) or {} for k in ("checker", "reward"))
    return {"correctness": checker.get("mean"), "correctness_ci95": checker.get("ci95"),
            "reward": reward.get("mean"), "reward_ci95": reward.get("ci95"), "eos_rate": model.get("eos_rate")}


def format_table(table: dict[str, dict]) -> str:
    """The demo's SFT / DPO / online-DPO table (markdown)."""
    def cell(value, ci):
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = ["| model | correctness [95% CI] | reward model score [95% CI] |", "|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {cell(r['correctness'], r['correctness_ci95'])} | "
                     f"{cell(r['reward'], r['reward_ci95'])} |")
    return "\n".join(lines)
