"""The online DPO driver (OAIF): sample, rank, train, push weights — one synchronous step.

    rayalign online-dpo --config jobs/online-dpo-tiny.yaml

Per step: take a batch of prompts from the Ray Dataset; the rollout actors (vLLM or HF)
sample two completions per prompt with weight version v; reward functions / reward models
(or a pairwise judge) pick chosen and rejected; each learner gets its share of the pairs,
attaches reference log-probs (reference actor, adapter-off pass, or none) and takes one
DPO step; the new weights (version v+1) are pushed to every rollout actor and checked
(fingerprint of what each engine loaded, and log-probs of a probe sequence); then metrics
(TRL's names), the completions table and checkpoints. The driver holds no model.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Any

import numpy as np
import ray

from rayalign import checkpoint as ckpt
from rayalign import storage
from rayalign import weight_sync as weight_sync_lib
from rayalign.actors.group import ActorGroup, GroupSpec, ensure_ray
from rayalign.actors.learner import PolicyLearner
from rayalign.actors.reference import Reference
from rayalign.actors.rollout import Rollout, actor_env, as_completion, generate, sampling_from_config
from rayalign.config import OnlineDPOConfig
from rayalign.data import DataError, load_prompt_rows
from rayalign.drivers import common
from rayalign.engines import resolve_backend
from rayalign.rewards import (RewardSources, check_reward_sources, probe_reward_functions, source_cpus,
                              source_labels)
from rayalign.rewards.judges import build_judge, check_judge_model, judge_pairs
from rayalign.rundir import RunDir
from rayalign.models.loading import load_tokenizer
from rayalign.tracking import ProgressReporter, average_metrics, plot_metrics

logger = logging.getLogger("rayalign")

PLOT_KEYS = ["objective/scores", "eval_objective/scores", "rewards/margins", "objective/kl", "loss",
             "val/contain_eos_token"]


class Prompts:
    """Validated prompt rows and their per-epoch order from a Ray Dataset."""

    def __init__(self, cfg: OnlineDPOConfig):
        tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
        self.rows, self.dropped = load_prompt_rows(cfg.train_dataset, tokenizer, "train_dataset", cfg.drop_bad_rows)
        self.eval_rows: list[dict] = []
        if cfg.eval_dataset:
            self.eval_rows, _ = load_prompt_rows(cfg.eval_dataset, tokenizer, "eval_dataset", cfg.drop_bad_rows)
        self.conversational = not isinstance(self.rows[0]["prompt"], str)
        self.batch = cfg.prompts_per_step
        self.steps_per_epoch = len(self.rows) // self.batch
        if self.steps_per_epoch < 1:
            raise DataError(f"train_dataset: {len(self.rows)} prompts are too few for one step of "
                            f"{cfg.learner.num_actors} learner(s) x per_device_train_batch_size="
                            f"{cfg.per_device_train_batch_size} x gradient_accumulation_steps="
                            f"{cfg.gradient_accumulation_steps}")
        self.seed = cfg.seed
        self._ds = None

    def epoch_batches(self, epoch: int, skip: int):
        """Row batches of one epoch (shuffled by a Ray Dataset with seed + epoch)."""
        if self._ds is None:
            self._ds = ray.data.range(len(self.rows))
        it = self._ds.random_shuffle(seed=self.seed + epoch).iter_batches(
            batch_size=self.batch, batch_format="numpy", drop_last=True)
        for i, batch in enumerate(it):
            if i >= skip:
                yield [self.rows[int(j)] for j in batch["id"]]


def train_online(cfg: OnlineDPOConfig) -> dict:
    """Run online DPO to the end; returns final metrics, the model dir and the checkpoint."""
    prompts = Prompts(cfg)  # every prompt row checked before anything starts
    common.check_models(cfg)
    if cfg.judge is None:
        check_reward_sources(cfg.reward_sources, trust_remote_code=cfg.trust_remote_code)
        probe_reward_functions(cfg.reward_sources, prompts.rows)
    else:
        check_judge_model(cfg.judge, "judge", trust_remote_code=cfg.trust_remote_code)
    backend = resolve_backend(cfg.rollout.backend)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * prompts.steps_per_epoch)
    resume, resume_step = common.check_run_start(cfg, total_steps)  # output dir and resume: before Ray starts
    with RunDir(cfg, resume_step) as run:
        ensure_ray(cfg.ray.address, _num_cpus(cfg), cfg.ray.namespace)
        return common.with_recovery(cfg, run, resume, lambda resume, recoveries: _attempt(
            cfg, prompts, backend, total_steps, run, resume, recoveries))


def _num_cpus(cfg: OnlineDPOConfig) -> int:
    if cfg.ray.num_cpus is not None:
        return cfg.ray.num_cpus
    need = cfg.learner.num_actors * cfg.learner.num_cpus_per_actor
    need += cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
    if cfg.reference_mode == "actor":
        need += cfg.reference.num_actors * cfg.reference.num_cpus_per_actor
    need += source_cpus(cfg.reward_sources, cfg.scoring)
    if cfg.judge is not None:
        need += cfg.judge.num_cpus
    return int(max(os.cpu_count() or 1, math.ceil(need) + 1))


class Step:
    """What one online step produced (kept for the completions table)."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.table: list[dict] = []


def _attempt(cfg: OnlineDPOConfig, prompts: Prompts, backend: str, total_steps: int, run: RunDir, resume,
             recoveries) -> dict:
    groups: list[ActorGroup] = []
    scorer = judge = batches = None
    try:
        references = None
        if cfg.reference_mode == "actor":
            references = ActorGroup(Reference, GroupSpec("reference", cfg.reference.num_actors,
                                                         cfg.reference.num_cpus_per_actor,
                                                         cfg.reference.num_gpus_per_actor),
                                    args=(cfg,), placement_timeout_s=cfg.ray.placement_timeout_s)
            groups.append(references)
        learners = ActorGroup(PolicyLearner, GroupSpec("learner", cfg.learner.num_actors,
                                                       cfg.learner.num_cpus_per_actor,
                                                       cfg.learner.num_gpus_per_actor),
                              args=(cfg,), placement_timeout_s=cfg.ray.placement_timeout_s)
        groups.append(learners)
        rcfg = weight_sync_lib.resolved_rollout_config(cfg, backend)  # engines must know: nccl or not
        rollouts = ActorGroup(Rollout, GroupSpec("rollout", rcfg.num_actors, rcfg.num_cpus_per_actor,
                                                 rcfg.num_gpus_per_actor),
                              args=(cfg.model_name_or_path, rcfg, backend, cfg.tokenizer_path,
                                    rcfg.max_model_len or cfg.max_length, cfg.trust_remote_code, cfg.bf16),
                              env_vars=actor_env(rcfg), placement_timeout_s=cfg.ray.placement_timeout_s)
        groups.append(rollouts)
        if cfg.judge is not None:
            judge, judge_group = build_judge(cfg.judge, max_length=cfg.max_length,
                                             trust_remote_code=cfg.trust_remote_code, nonfinite=cfg.nonfinite_scores)
            groups.append(judge_group)
        else:
            scorer = RewardSources(cfg.reward_sources, cfg.reward_weights, cfg.scoring, cfg.max_length,
                                   cfg.trust_remote_code, nonfinite=cfg.nonfinite_scores,
                                   labels=source_labels(cfg.reward_sources, len(cfg.reward_funcs)))

        learners.init_distributed(common.backend(cfg), cfg.learner.collective_timeout_s)
        ref_handles = [references.actors[i % len(references)] if references else None for i in range(len(learners))]
        info = learners.scatter("setup", [(total_steps, h) for h in ref_handles])[0]
        logger.info("learners ready: %s; rollout backend %s x %d: %s", info, backend, len(rollouts),
                    rollouts.call("ready", timeout=rcfg.generate_timeout_s))

        state: dict[str, Any] = {"step": 0, "log_history": []}
        if resume:
            local = ckpt.download_checkpoint(resume, common.staging_root(cfg))
            learners.call("load", local)
            state = ckpt.load_trainer_state(local)
            logger.info("resumed from %s at step %d", resume, state["step"])
        files = storage.RunFiles(cfg.output_dir)
        if resume:
            files.pull()
        tracker = None  # opened once the first step succeeded: the run owns the dir from then on
        sync = weight_sync_lib.build_channel(cfg, learners, rollouts, info_vocab=_vocab_size(cfg),
                                             mode=rcfg.weight_sync)
        sync.push(version=state["step"])  # engines start from the learner's (restored) weights
        progress = ProgressReporter(total_steps, enabled=cfg.logging.progress_bar, desc="rayalign online-dpo")
        rng = random.Random(cfg.seed * 7919 + state["step"])
        sampling = sampling_from_config(cfg, n=2)
        log_every = cfg.log_completions_steps or cfg.logging_steps

        interval: list[dict] = []
        final_eval: dict = {}
        t0 = time.time()
        epoch = None
        for step in range(state["step"], total_steps):
            step_epoch, in_epoch = divmod(step, prompts.steps_per_epoch)
            if step_epoch != epoch:
                if batches is not None:
                    batches.close()
                epoch, batches = step_epoch, prompts.epoch_batches(step_epoch, in_epoch)
            rows = next(batches)
            result = _online_step(cfg, rows, step, prompts.conversational, rollouts, learners, scorer, judge,
                                  sampling, sync, rng, cfg.beta_for_epoch(step_epoch))
            if tracker is None:
                tracker = common.open_tracker(cfg, run, files, state["step"], recoveries)
                sync.log_to(files.local_dir)
            interval.append(result.metrics)
            done = step + 1
            if cfg.log_completions and (done % log_every == 0 or done == total_steps):
                tracker.log_table("completions", result.table[: cfg.num_completions_to_log], done)
            if done % cfg.logging_steps == 0 or done == total_steps:
                metrics = {**average_metrics(interval), "epoch": done / prompts.steps_per_epoch,
                           "sync/version": float(sync.version)}
                tracker.log(metrics, step=done)
                state["log_history"].append({"step": done, **metrics})
                interval = []
                progress.update(done, metrics, samples=done * cfg.prompts_per_step * 2)
                files.sync(("metrics.jsonl", "weight_sync.jsonl"))
            if prompts.eval_rows and cfg.eval_steps and done % cfg.eval_steps == 0:
                final_eval = evaluate(cfg, prompts, rollouts, scorer, tracker, done)
                state["log_history"].append({"step": done, **final_eval})
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                common.save(cfg, learners, {**state, "step": done, "epoch": done / prompts.steps_per_epoch},
                            name=f"checkpoint-{done}", metrics=final_eval, run_id=run.run_id)
                files.sync()
        elapsed = time.time() - t0
        steps_run = total_steps - state["step"]
        if prompts.eval_rows and (not cfg.eval_steps or total_steps % cfg.eval_steps != 0):
            final_eval = evaluate(cfg, prompts, rollouts, scorer, tracker, total_steps)
        final_state = {**state, "step": total_steps, "epoch": total_steps / prompts.steps_per_epoch}
        common.save(cfg, learners, final_state, name=f"checkpoint-{total_steps}", metrics=final_eval,
                    run_id=run.run_id)
        model_dir = common.publish_final(cfg, total_steps, final_eval)
        throughput = {"train_runtime": elapsed,
                      "train_samples_per_second": steps_run * cfg.prompts_per_step * 2 / max(elapsed, 1e-9),
                      "train_steps_per_second": steps_run / max(elapsed, 1e-9)}
        tracker.log(throughput, step=total_steps)
        tracker.close()
        progress.close()
        plot_metrics(f"{files.local_dir}/metrics.jsonl", files.local_dir, keys=PLOT_KEYS)
        files.sync(extra=("metrics.png", "weight_sync.jsonl"))
        train_logs = [h for h in state["log_history"] if "loss" in h]
        return {"metrics": {**(train_logs[-1] if train_logs else {}), **final_eval, **throughput},
                "model_dir": model_dir, "checkpoint": f"{cfg.output_dir}/checkpoint-{total_steps}",
                "total_steps": total_steps, "backend": backend, "history": state["log_history"]}
    finally:
        if batches is not None:  # an open Ray Data iterator outliving Ray would re-init it at exit
            batches.close()
        if scorer is not None:
            scorer.shutdown()
        for group in groups:
            group.shutdown()


def _vocab_size(cfg: OnlineDPOConfig) -> int:
    return len(load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code))


def _online_step(cfg, rows, step, conversational, rollouts, learners, scorer, judge, sampling, sync, rng, beta) -> Step:
    out = Step()
    t = time.time()
    completions = generate(rollouts, [r["prompt_ids"] for r in rows], sampling,
                           seed=cfg.seed * 1_000_003 + step * 104_729, version=sync.version,
                           timeout=cfg.rollout.generate_timeout_s)
    out.metrics["timing/generate_s"] = time.time() - t

    t = time.time()
    n = len(rows)
    prompts = [r["prompt"] for r in rows]
    flat = [c for pair in completions for c in pair]  # prompt-major: (p0 a, p0 b, p1 a, ...)
    texts = [as_completion(c["text"], conversational) for c in flat]
    eos = np.array([c["eos"] for c in flat])
    scores = None
    if scorer is not None:
        extra = {k: [r.get(k) for r in rows for _ in range(2)] for k in rows[0] if k not in ("prompt", "prompt_ids")}
        total, per_source = scorer.score([p for p in prompts for _ in range(2)], texts,
                                         [c["token_ids"] for c in flat], eos.tolist(), cfg.missing_eos_penalty,
                                         **extra)
        scores = total.reshape(n, 2)
        first_wins = scores[:, 0] >= scores[:, 1]  # TRL: ties go to the first sample
        out.metrics.update(per_source)
        out.metrics["objective/scores"] = float(total.mean())
    else:
        answers = judge_pairs(judge, prompts, [(texts[2 * i], texts[2 * i + 1]) for i in range(n)],
                              shuffle_order=cfg.judge.shuffle_order, rng=rng)
        ties = [a < 0 for a in answers]
        first_wins = np.array([(rng.random() < 0.5) if a < 0 else a == 0 for a in answers])
        out.metrics["judge/ties"] = float(np.mean(ties))
    out.metrics["timing/score_s"] = time.time() - t

    pairs = []
    for i, (row, pair) in enumerate(zip(rows, completions)):
        c, r = (0, 1) if first_wins[i] else (1, 0)
        item = {"prompt_ids": row["prompt_ids"], "chosen_ids": pair[c]["token_ids"],
                "rejected_ids": pair[r]["token_ids"]}
        if scores is not None:
            item["chosen_score"], item["rejected_score"] = float(scores[i, c]), float(scores[i, r])
        pairs.append(item)
        if len(out.table) < cfg.num_completions_to_log:
            out.table.append({"prompt": _as_text(row["prompt"]), "chosen": pair[c]["text"],
                              "rejected": pair[r]["text"],
                              "chosen_score": item.get("chosen_score"), "rejected_score": item.get("rejected_score")})
    if scores is not None:
        out.metrics["objective/scores_margin"] = float(np.mean([p["chosen_score"] - p["rejected_score"] for p in pairs]))
    out.metrics["val/contain_eos_token"] = float(eos.mean())

    t = time.time()
    per = len(pairs) // len(learners)
    results = learners.scatter("train_pairs", [(pairs[i * per:(i + 1) * per], beta) for i in range(len(learners))],
                               timeout=cfg.learner.collective_timeout_s)
    out.metrics.update(average_metrics(results))
    out.metrics["timing/train_s"] = time.time() - t
    out.metrics.update(sync.push(version=step + 1))
    return out


def _as_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def evaluate(cfg: OnlineDPOConfig, prompts: Prompts, rollouts: ActorGroup, scorer, tracker, step: int) -> dict:
    """Greedy completions for the eval prompts, scored by the reward sources."""
    rows = prompts.eval_rows
    sampling = {**sampling_from_config(cfg, n=1), "temperature": 0.0}
    completions = generate(rollouts, [r["prompt_ids"] for r in rows], sampling, seed=cfg.seed, version=step,
                           timeout=cfg.rollout.generate_timeout_s)
    flat = [c[0] for c in completions]
    metrics = {"eval_val/contain_eos_token": float(np.mean([c["eos"] for c in flat]))}
    if scorer is not None:
        texts = [as_completion(c["text"], prompts.conversational) for c in flat]
        extra = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids")}
        total, _ = scorer.score([r["prompt"] for r in rows], texts, [c["token_ids"] for c in flat],
                                [c["eos"] for c in flat], None, **extra)
        metrics["eval_objective/scores"] = float(total.mean())
    tracker.log(metrics, step=step)
    logger.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics
