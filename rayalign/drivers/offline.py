"""The offline training driver: SFT, DPO and reward models share one synchronous loop.

    rayalign dpo --config jobs/dpo-tiny.yaml          # or: rayalign sft / rayalign reward

Each step: every learner pulls gradient_accumulation_steps micro-batches from its own
Ray Data shard (streaming_split), attaches reference log-probs (precomputed columns, its
reference actor, or its adapter-off pass), and takes one DeepSpeed step; the driver
averages their metrics, logs, evaluates, and checkpoints. It holds no model.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

from rayalign import checkpoint as ckpt
from rayalign import storage
from rayalign.actors.group import ActorGroup, GroupSpec, defer_interrupts, ensure_ray
from rayalign.actors.learner import PolicyLearner
from rayalign.actors.reference import Reference
from rayalign.config import DPOConfig, RewardConfig, TrainConfig
from rayalign.drivers import common
from rayalign.rundir import RunDir
from rayalign.tracking import ProgressReporter, average_metrics, plot_metrics

logger = logging.getLogger("rayalign")

PLOT_KEYS = {
    "dpo": ["loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "rewards/accuracies",
            "eval_rewards/accuracies"],
    "sft": ["loss", "eval_loss", "learning_rate"],
    "reward": ["loss", "eval_loss", "accuracy", "eval_accuracy", "margin", "eval_margin"],
}


def job_kind(cfg: TrainConfig) -> str:
    return "dpo" if isinstance(cfg, DPOConfig) else "reward" if isinstance(cfg, RewardConfig) else "sft"


def train(cfg: TrainConfig, report: Callable[[dict], None] | None = None) -> dict:
    """Run one offline job to the end; returns final metrics and the model directory.
    `report` (Ray Tune) receives the latest train + eval metrics after every evaluation."""
    kind = job_kind(cfg)
    common.check_models(cfg)  # model dirs: files, safetensors headers, custom code, vocab size
    data = common.prepare_data(cfg, kind)  # validates paths and rows before any actor starts
    steps_per_epoch = common.steps_per_epoch(data.num_train_rows, cfg)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    resume, resume_step = common.check_run_start(cfg, total_steps)  # output dir and resume: before Ray starts
    with RunDir(cfg, resume_step) as run:
        ensure_ray(cfg.ray.address, common.local_num_cpus(cfg), cfg.ray.namespace)
        train_ds, eval_batches = data.build(cfg)
        cache_status = ("hit" if data.cache_hit else "miss") if data.uses_cache else None
        return common.with_recovery(cfg, run, resume, lambda resume, recoveries: _attempt(
            cfg, kind, run, data, train_ds, eval_batches, cache_status, steps_per_epoch, total_steps, resume,
            report, recoveries))


def _attempt(cfg, kind, run, data, train_ds, eval_batches, cache_status, steps_per_epoch, total_steps,
             resume, report, recoveries) -> dict:
    """One try at the run: start the actor groups, restore `resume` if given, train to the end."""
    placements = common.group_placements(cfg)
    references = None
    if kind == "dpo" and cfg.reference_mode == "actor":
        references = ActorGroup(Reference, GroupSpec("reference", cfg.reference.num_actors,
                                                     cfg.reference.num_cpus_per_actor,
                                                     cfg.reference.num_gpus_per_actor),
                                args=(cfg,), placement_timeout_s=cfg.ray.placement_timeout_s,
                                placement=placements["reference"])
    learners = ActorGroup(PolicyLearner, GroupSpec("learner", cfg.learner.num_actors,
                                                   cfg.learner.num_cpus_per_actor,
                                                   cfg.learner.num_gpus_per_actor),
                          args=(cfg,), placement_timeout_s=cfg.ray.placement_timeout_s,
                          placement=placements["learner"])
    try:
        learners.init_distributed(common.backend(cfg), cfg.learner.collective_timeout_s)
        ref_handles = [references.actors[i % len(references)] if references else None
                       for i in range(len(learners))]
        info = learners.scatter("setup", [(total_steps, h) for h in ref_handles])[0]
        logger.info("learners ready: %s", info)

        state = {"step": 0, "log_history": []}
        if resume:
            local = ckpt.download_checkpoint(resume, common.staging_root(cfg))
            learners.call("load", local)
            state = ckpt.load_trainer_state(local)
            logger.info("resumed from %s at step %d", resume, state["step"])
        files = storage.RunFiles(cfg.output_dir)  # logs: local, or a mirror synced to the URI
        if resume:
            files.pull()
        tracker = None  # opened once the first step succeeded: the run owns the dir from then on
        progress = ProgressReporter(total_steps, enabled=cfg.logging.progress_bar, desc=f"rayalign {kind}")

        epoch = None
        interval: list[dict] = []
        final_eval: dict = {}
        t0 = time.time()
        defer_interrupts(cfg.save_on_interrupt)  # a signal from here on: finish the step, save, stop
        for step in range(state["step"], total_steps):
            step_epoch, step_in_epoch = divmod(step, steps_per_epoch)
            if step_epoch != epoch:  # a new epoch: reshuffle and hand each learner its shard
                if epoch is not None:
                    learners.call("drain")
                    data.end_epoch(cfg)
                epoch = step_epoch
                shards = train_ds(epoch).streaming_split(len(learners), equal=True)
                learners.scatter("set_data", [(s, epoch, step_in_epoch * cfg.gradient_accumulation_steps)
                                              for s in shards])
            results = learners.call("train_step", timeout=cfg.learner.collective_timeout_s)
            if tracker is None:
                tracker = common.open_tracker(cfg, run, files, state["step"], recoveries)
            interval.append(average_metrics(results))
            done = step + 1
            if done % cfg.logging_steps == 0 or done == total_steps:
                metrics = {**average_metrics(interval), "epoch": done / steps_per_epoch}
                tracker.log(metrics, step=done)
                state["log_history"].append({"step": done, **metrics})
                interval = []
                progress.update(done, metrics, samples=done * cfg.global_batch_size)
                files.sync(("metrics.jsonl",))
            if kind == "dpo" and cfg.sync_ref_model and done % cfg.ref_model_sync_steps == 0:
                policy = learners.call("full_state_dict")[0]
                references.call("mix_weights", policy, cfg.ref_model_mixup_alpha)
            if eval_batches and cfg.eval_steps and done % cfg.eval_steps == 0:
                final_eval = common.evaluate(learners, eval_batches, tracker, done)
                state["log_history"].append({"step": done, **final_eval})
                if report is not None and done < total_steps:
                    report(_latest(state["log_history"], done))
            if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
                common.save(cfg, learners, {**state, "step": done, "epoch": done / steps_per_epoch},
                            name=f"checkpoint-{done}", metrics=final_eval, run_id=run.run_id)
                files.sync()
            common.stop_if_interrupted(cfg, learners, state, done, total_steps, steps_per_epoch, run, files, final_eval)
        defer_interrupts(False)
        elapsed = time.time() - t0
        steps_run = total_steps - state["step"]
        if eval_batches and (not cfg.eval_steps or total_steps % cfg.eval_steps != 0):
            final_eval = common.evaluate(learners, eval_batches, tracker, total_steps)
        if kind == "dpo" and cfg.generate_during_eval:
            common.log_generations(cfg, learners, references, data, tracker, total_steps)
        learners.call("drain")
        data.end_epoch(cfg)
        final_state = {**state, "step": total_steps, "epoch": total_steps / steps_per_epoch}
        common.save(cfg, learners, final_state, name=f"checkpoint-{total_steps}", metrics=final_eval,
                    run_id=run.run_id)
        model_dir = common.publish_final(cfg, total_steps, final_eval)
        throughput = {"train_runtime": elapsed,
                      "train_samples_per_second": steps_run * cfg.global_batch_size / max(elapsed, 1e-9),
                      "train_steps_per_second": steps_run / max(elapsed, 1e-9)}
        tracker.log(throughput, step=total_steps)
        tracker.close()
        progress.close()
        plot_metrics(f"{files.local_dir}/metrics.jsonl", files.local_dir, keys=PLOT_KEYS[kind])
        files.sync(extra=("metrics.png",))
        train_logs = [h for h in state["log_history"] if "loss" in h]
        last_train = train_logs[-1] if train_logs else {}
        if report is not None:
            report({**_latest(state["log_history"], total_steps), **final_eval, **throughput,
                    "checkpoint": f"{cfg.output_dir}/checkpoint-{total_steps}",
                    "reference_cache_hit": float(cache_status == "hit")})
        return {"metrics": {**last_train, **final_eval, **throughput}, "model_dir": model_dir,
                "checkpoint": f"{cfg.output_dir}/checkpoint-{total_steps}", "total_steps": total_steps,
                "reference_cache": cache_status}
    finally:
        defer_interrupts(False)
        learners.shutdown()
        if references is not None:
            references.shutdown()


def _latest(history: list[dict], step: int) -> dict:
    """The newest value of every metric logged up to `step`, with `step` itself."""
    out: dict = {}
    for row in history:
        if row["step"] <= step:
            out.update(row)
    out["step"] = step
    return out
