"""Learning efficiency on the demo task: rayalign vs TRL 1.16, online DPO (OnlineDPOTrainer)
and offline DPO (DPOTrainer), held-out correctness after N steps on both sides.

    cd benchmarks && ../.venv/bin/python learn_online_dpo.py [--algo online|offline]
        [--setup demo|tiny] [--lr 5e-4] [--temperature 1.0] [--steps 120] [--batch 32]
        [--eval-every 40] [--sides trl,rayalign] [--workdir DIR]

--setup demo (the default) is `make demo`'s: its small model, SFT on the sloppy
demonstrations, 8000 preference pairs, built once per --workdir with the demo's own SFT
config and reused. --setup tiny is the earlier demo (the 2 x 64 tiny model, clean SFT), where
online DPO as TRL defines it does not learn (RESULTS.md).

Online: both sides sample two completions for each of the same prompts
(`prompts_train.jsonl`), rank them with the same reward (`rayalign.demo.task:demo_reward`,
a missing eos costs 1), and run sigmoid DPO against a live reference with the same
hyperparameters (beta 0.1, the same lr schedule: --scheduler, constant by default,
max_length 64, max_new_tokens 16). Offline: both sides run sigmoid DPO on the same pairs
(`pref_train.jsonl`) with the same batch, beta and lr schedule, live reference, max_length 64.
Every
--eval-every steps each side's policy answers the 200 held-out problems greedily
(`prompts_eval.jsonl`, HF generate in this process) and the task's checker scores them:
the held-out correctness curve, with its 95% interval. TRL evaluates inside a callback;
rayalign saves a checkpoint at those steps and each one is evaluated afterwards, by the same
function. Train-side curves (`objective/scores`, `rewards/margins`, `loss`) come from each
side's own logs. Prints a table and writes the JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MAX_LENGTH, MAX_NEW_TOKENS, EOS_PENALTY = 64, 16, 1.0


def build(workdir: Path, setup: str) -> tuple[Path, Path]:
    """(SFT model dir, data dir): the demo's model, data and SFT stage (400 steps)."""
    import rayalign
    from rayalign.demo.pipeline import sft_config
    from rayalign.demo.task import DEMO_N_PREF, build_demo_model, write_demo_data

    data = workdir / "data"
    sft = workdir / "sft"
    if (sft / "model.safetensors").exists():
        return sft, data
    if setup == "demo":
        model = build_demo_model(workdir / "small-model", seed=0, size="small")
        write_demo_data(data, seed=0, n_pref=DEMO_N_PREF)
        rayalign.train_sft(sft_config(model, data, sft, seed=0))
    else:
        model = build_demo_model(workdir / "tiny-model", seed=0)
        write_demo_data(data, seed=0)
        rayalign.train_sft({
            "model_name_or_path": str(model), "train_dataset": str(data / "sft_train.jsonl"),
            "output_dir": str(sft), "gradient_checkpointing": False, "overwrite_output_dir": True, "max_steps": 400,
            "per_device_train_batch_size": 32, "learning_rate": 3e-3, "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.05, "logging_steps": 100, "max_length": MAX_LENGTH, "seed": 0,
            "save_total_limit": 1, "logging": {"progress_bar": False, "report_to": []},
            "learner": {"num_actors": 1, "num_cpus_per_actor": 1}})
    return sft, data


def correctness(model, tokenizer, prompts: list[str]) -> dict:
    """Greedy held-out correctness and its 95% Wilson interval."""
    from rayalign.demo.task import check_answers
    from rayalign.evaluation import wilson_interval
    from rayalign.models.generate import generate_texts

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    ok = check_answers(prompts, generate_texts(model, tokenizer, ids, MAX_NEW_TOKENS))
    return {"correctness": sum(ok) / len(ok), "ci95": list(wilson_interval(sum(ok), len(ok)))}


def _eval_callback(tok, prompts: list[str], every: int, curve: list):
    from transformers import TrainerCallback

    class Eval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                curve.append({"step": state.global_step, **correctness(model, tok, prompts)})

    return Eval()


def _train_log(rows) -> list[dict]:
    keys = ("step", "loss", "objective/scores", "rewards/margins", "rewards/accuracies", "val/contain_eos_token")
    return [{k: v for k, v in r.items() if k in keys} for r in rows if "loss" in r]


def _trl_args(out: Path, a) -> dict:
    """The training arguments both TRL trainers share here."""
    return dict(output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=a.batch,
                max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type=a.scheduler, max_length=MAX_LENGTH,
                logging_steps=10, save_strategy="no", dataloader_num_workers=0, seed=a.seed, disable_tqdm=True,
                bf16=False)


def _trl_train(make_trainer, sft: Path, data: Path, a) -> dict:
    """Build a TRL trainer (`make_trainer(tokenizer, callback)`), evaluate it at the start and
    every --eval-every steps, train it; the curve and the train log."""
    from transformers import AutoTokenizer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(sft)
    prompts = [json.loads(x)["prompt"] for x in open(data / "prompts_eval.jsonl")]
    curve: list = []
    trainer = make_trainer(tok, _eval_callback(tok, prompts, a.eval_every, curve))
    start = correctness(trainer.model, tok, prompts)
    t0 = time.perf_counter()
    trainer.train()
    return {"start": start, "curve": curve, "train_log": _train_log(trainer.state.log_history),
            "wall_s": time.perf_counter() - t0}


def run_trl_offline(sft: Path, data: Path, out: Path, a) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_trl_args(out, a), beta=a.beta, loss_type=["sigmoid"], gradient_checkpointing=False)
    rows = [json.loads(x) for x in open(data / "pref_train.jsonl")]
    return _trl_train(lambda tok, callback: DPOTrainer(
        AutoModelForCausalLM.from_pretrained(sft), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tok, callbacks=[callback]), sft, data, a)


def run_trl(sft: Path, data: Path, out: Path, a) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from rayalign.demo import task

    args = OnlineDPOConfig(**_trl_args(out, a), max_new_tokens=MAX_NEW_TOKENS, temperature=a.temperature,
                           beta=[a.beta], loss_type="sigmoid", missing_eos_penalty=EOS_PENALTY)
    rows = [json.loads(x) for x in open(data / "prompts_train.jsonl")]
    return _trl_train(lambda tok, callback: OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(sft), reward_funcs=[getattr(task, a.reward)], args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[callback]), sft, data, a)


def run_rayalign_offline(sft: Path, data: Path, out: Path, a) -> dict:
    import rayalign

    t0 = time.perf_counter()
    rayalign.train_dpo({
        "model_name_or_path": str(sft), "train_dataset": str(data / "pref_train.jsonl"), "output_dir": str(out),
        "gradient_checkpointing": False, "overwrite_output_dir": True, "max_steps": a.steps,
        "per_device_train_batch_size": a.batch, "learning_rate": a.lr, "lr_scheduler_type": a.scheduler,
        "beta": a.beta, "loss_type": "sigmoid", "max_length": MAX_LENGTH, "logging_steps": 10,
        "save_steps": a.eval_every, "save_total_limit": None, "seed": a.seed,
        "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
        "reference": {"mode": "actor", "num_cpus_per_actor": 0.5}})
    return _rayalign_curves(sft, data, out, time.perf_counter() - t0)


def run_rayalign(sft: Path, data: Path, out: Path, a) -> dict:
    import rayalign

    t0 = time.perf_counter()
    rayalign.train_online_dpo({
        "model_name_or_path": str(sft), "train_dataset": str(data / "prompts_train.jsonl"),
        "output_dir": str(out), "gradient_checkpointing": False, "overwrite_output_dir": True, "max_steps": a.steps,
        "per_device_train_batch_size": a.batch, "learning_rate": a.lr, "lr_scheduler_type": a.scheduler,
        "beta": a.beta, "loss_type": "sigmoid", "max_length": MAX_LENGTH, "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": a.temperature, "reward_funcs": [f"rayalign.demo.task:{a.reward}"],
        "missing_eos_penalty": EOS_PENALTY, "logging_steps": 10, "save_steps": a.eval_every,
        "save_total_limit": None, "seed": a.seed, "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
        "reference": {"mode": "actor", "num_cpus_per_actor": 0.5},
        "rollout": {"backend": a.backend, "num_actors": 1, "num_cpus_per_actor": 0.5}})
    return _rayalign_curves(sft, data, out, time.perf_counter() - t0)


def _rayalign_curves(sft: Path, data: Path, out: Path, wall: float) -> dict:
    """Held-out correctness of the start model and of each saved checkpoint, and the train log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    prompts = [json.loads(x)["prompt"] for x in open(data / "prompts_eval.jsonl")]
    start = correctness(AutoModelForCausalLM.from_pretrained(sft), tok, prompts)
    curve = []
    for ckpt in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        curve.append({"step": int(ckpt.name.split("-")[1]),
                      **correctness(AutoModelForCausalLM.from_pretrained(ckpt), tok, prompts)})
    return {"start": start, "curve": curve, "train_log": _train_log(map(json.loads, open(out / "metrics.jsonl"))),
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algo", choices=["online", "offline"], default="online")
    p.add_argument("--setup", choices=["demo", "tiny"], default="demo")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--scheduler", default="constant", help="lr_scheduler_type, both sides")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="hf")
    p.add_argument("--reward", default="demo_reward", help="a reward function of rayalign.demo.task")
    p.add_argument("--sides", default="trl,rayalign")
    p.add_argument("--workdir", default=None, help="default /tmp/learn-dpo-<setup>")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    import logging

    logging.disable(logging.WARNING)
    workdir = Path(a.workdir or f"/tmp/learn-dpo-{a.setup}")
    sft, data = build(workdir, a.setup)
    tag = (f"{a.algo}-{a.setup}-{a.reward if a.algo == 'online' else 'pairs'}-lr{a.lr:g}-t{a.temperature:g}"
           f"-beta{a.beta:g}-bs{a.batch}-n{a.steps}-s{a.seed}" + ("" if a.scheduler == "constant" else f"-{a.scheduler}"))
    results = {"settings": vars(a)}
    for side in a.sides.split(","):
        fn = {("trl", "online"): run_trl, ("rayalign", "online"): run_rayalign,
              ("trl", "offline"): run_trl_offline, ("rayalign", "offline"): run_rayalign_offline}[side, a.algo]
        results[side] = fn(sft, data, workdir / f"{side}-{tag}", a)
        r = results[side]
        last = r["train_log"][-1] if r["train_log"] else {}
        print(f"{side} {tag}: start {r['start']['correctness']:.3f} -> " +
              ", ".join(f"{c['step']}: {c['correctness']:.3f}" for c in r["curve"]) +
              f" | last log {json.dumps({k: round(v, 3) for k, v in last.items()})} | {r['wall_s']:.0f}s",
              flush=True)
    path = Path(a.json) if a.json else workdir / f"learn-{tag}.json"
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
