"""The run skeleton every training job shares: a job supplies its actor groups and one step.

`run(job)` owns what is the same for SFT, DPO, reward models and online DPO: the run dir
(lock, overwrite, resume checks), Ray start-up, retries after an actor failure (a new
attempt from this run's last checkpoint), restoring a checkpoint, run files and the
metrics tracker (opened once the first step succeeded), logging / evaluation / checkpoint
cadence, save-on-interrupt, the final save and publish, throughput and plots.

A `Job` says how to start its actor groups (`start`), what one step does (`step`), how it
evaluates (`evaluate`) and what it adds to logs and results; it holds no run mechanics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from rayalign import checkpoint as ckpt
from rayalign import hub, rundir, storage
from rayalign.actors import group
from rayalign.actors.group import ActorFailure, ActorGroup, ensure_ray
from rayalign.config import ConfigError, TrainConfig
from rayalign.drivers.common import staging_root
from rayalign.tracking import MetricsLogger, ProgressReporter, average_metrics, plot_metrics

logger = logging.getLogger("rayalign")


@dataclass
class StepResult:
    """What one step produced: metrics to average over the logging interval, and for online
    DPO the rows of the completions table and the sampled completion lengths."""

    metrics: dict[str, float]
    table: list[dict] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepRecord:
    """Handed to a `run(..., on_step=)` hook after every step (benchmarks time the steps)."""

    step: int  # 0-based index of the step that just ran
    result: StepResult
    started: float  # time.time() around job.step
    finished: float


class Job(ABC):
    """One kind of training job, as the run skeleton drives it."""

    name: str  # progress bar and logs: "dpo", "sft", "reward", "online-dpo"
    plot_keys: list[str]  # metrics drawn into metrics.png at the end
    log_files: tuple[str, ...] = ("metrics.jsonl",)  # copied up to a remote output_dir at every log

    def __init__(self, cfg: TrainConfig, total_steps: int | None, steps_per_epoch: int | None,
                 samples_per_step: int):
        # None: sized by prepare() (an offline job counts its rows once Ray has tokenized them)
        self.cfg = cfg
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.samples_per_step = samples_per_step

    def size_by_epoch(self, steps_per_epoch: int) -> None:
        """Set the epoch's length once known, and total_steps from it unless max_steps set it:
        num_train_epochs epochs, rounded up (TrainingArguments' rule)."""
        cfg = self.cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    def num_cpus(self) -> int | None:
        """Logical CPUs of a local Ray started for this job (None: Ray's default)."""
        return None

    def prepare(self) -> None:
        """Once Ray runs, before the first attempt (e.g. create the Ray Datasets)."""

    @abstractmethod
    def start(self) -> ActorGroup:
        """Start this attempt's actor groups with fresh weights; returns the learner group."""

    def begin(self, step: int) -> None:
        """The learners hold step `step`'s weights (restored or initial); the loop starts."""

    @abstractmethod
    def step(self, step: int) -> StepResult:
        """Run step `step` (0-based) to the end: its optimizer update included."""

    @property
    def has_eval(self) -> bool:
        return False

    def evaluate(self, step: int) -> dict[str, float]:
        """eval_* metrics of the current weights."""
        return {}

    def owns_dir(self, log_dir: str) -> None:
        """The run owns its output dir from now on (its first step succeeded)."""

    def log_step(self, done: int, result: StepResult, tracker: MetricsLogger) -> None:
        """After each step: job-specific logs (e.g. the completions table)."""

    def log_extras(self) -> dict[str, float]:
        """Added to every metrics line."""
        return {}

    def finish(self, tracker: MetricsLogger) -> None:
        """After the last step and the final evaluation, before the final save."""

    def summary(self) -> dict:
        """Extra entries of the returned result."""
        return {}

    def report_extras(self) -> dict:
        """Extra entries of the final Ray Tune report."""
        return {}

    def stop(self) -> None:
        """Shut this attempt's actor groups down (also after a failed or partial start)."""


def run(job: Job, report: Callable[[dict], None] | None = None,
        on_step: Callable[[StepRecord], None] | None = None) -> dict:
    """Run `job` to the end; returns final metrics, the model dir and the last checkpoint.
    `report` (Ray Tune) receives the latest metrics after every evaluation."""
    cfg = job.cfg
    # Output dir and resume before Ray starts; a job sized by its data (the rows are counted
    # once Ray tokenized them) checks the schedule and the resume step's end after prepare().
    sized = job.steps_per_epoch is not None
    resume, resume_step = check_run_start(cfg, job.total_steps)  # total None: its end is checked below
    end_checked = job.total_steps is not None
    if sized:
        cfg.check_best_schedule(job.total_steps, job.steps_per_epoch)
    pusher = hub.HubPusher(cfg) if cfg.push_to_hub else None  # the repo exists (or fails) before training
    try:
        with rundir.RunDir(cfg, resume_step) as run_dir:
            ensure_ray(cfg.ray.address, job.num_cpus(), cfg.ray.namespace)
            storage.check_shared(cfg.output_dir)  # multi-node: every node must reach the run's files
            cache_dir = getattr(getattr(cfg, "reference", None), "cache_dir", None)
            if cache_dir:
                storage.check_shared(cache_dir, "reference.cache_dir")
            job.prepare()
            if resume is not None and not end_checked:
                rundir.check_resume_end(resume, resume_step, job.total_steps)
            if not sized:
                cfg.check_best_schedule(job.total_steps, job.steps_per_epoch)
            return with_recovery(cfg, run_dir, resume, lambda resume, recoveries: _attempt(
                job, run_dir, resume, recoveries, report, on_step, pusher))
    finally:
        if pusher is not None:
            pusher.close()


def _attempt(job: Job, run_dir: rundir.RunDir, resume: str | None, recoveries: int, report, on_step,
             pusher: hub.HubPusher | None = None) -> dict:
    """One try at the run: start the actor groups, restore `resume` if given, train to the end."""
    cfg, total = job.cfg, job.total_steps
    try:
        learners = job.start()
        state = {"step": 0, "log_history": []}
        if resume:
            local = ckpt.download_checkpoint(resume, staging_root(cfg))
            learners.call("load", local)
            state = ckpt.load_trainer_state(local)
            if state.get("best_model_checkpoint") and not storage.exists(state["best_model_checkpoint"]):
                state["best_model_checkpoint"] = None  # transformers: a best checkpoint that is gone is dropped
            logger.info("resumed from %s at step %d", resume, state["step"])
        files = storage.RunFiles(cfg.output_dir)  # logs: local, or a mirror synced to the URI
        if resume:
            files.pull()
        job.begin(state["step"])
        tracker = None  # opened once the first step succeeded: the run owns the dir from then on
        progress = ProgressReporter(total, enabled=cfg.logging.progress_bar, desc=f"rayalign {job.name}")

        interval: list[dict] = []
        final_eval: dict = {}
        log_every, eval_every, save_every = (cfg.every(kind, total, job.steps_per_epoch)
                                             for kind in ("logging", "eval", "save"))
        # this run's schedule, for trainer_state.json (a resumed checkpoint's may differ)
        state.update(max_steps=total, num_train_epochs=math.ceil(total / job.steps_per_epoch),
                     logging_steps=log_every, eval_steps=eval_every, save_steps=save_every)
        t0 = time.time()
        group.defer_interrupts(cfg.save_on_interrupt)  # a signal from here on: finish the step, save, stop
        for step in range(state["step"], total):
            started = time.time()
            result = job.step(step)
            finished = time.time()
            if tracker is None:
                tracker = open_tracker(cfg, run_dir, files, state["step"], recoveries)
                job.owns_dir(files.local_dir)
            if on_step is not None:
                on_step(StepRecord(step, result, started, finished))
            interval.append(result.metrics)
            done = step + 1
            job.log_step(done, result, tracker)
            if (log_every and done % log_every == 0) or done == total:
                metrics = {**average_metrics(interval), "epoch": done / job.steps_per_epoch, **job.log_extras()}
                tracker.log(metrics, step=done)
                state["log_history"].append({"step": done, **metrics})
                interval = []
                progress.update(done, metrics, samples=done * job.samples_per_step)
                files.sync(job.log_files)
            improved = False
            if job.has_eval and eval_every and done % eval_every == 0:
                final_eval = _evaluate(job, tracker, done)
                state["log_history"].append({"step": done, "epoch": done / job.steps_per_epoch, **final_eval})
                improved = update_best(cfg, state, final_eval, done)
                if report is not None and done < total:
                    report(_latest(state["log_history"], done))
            saving = bool(save_every and done % save_every == 0) or (cfg.save_strategy == "best" and improved)
            if saving and done < total:
                mark_best_checkpoint(cfg, state, done)
                path = save(cfg, learners, {**state, "step": done, "epoch": done / job.steps_per_epoch},
                            name=f"checkpoint-{done}", metrics=final_eval, run_id=run_dir.run_id)
                files.sync()
                if pusher is not None and cfg.hub_strategy == "every_save":
                    ckpt.publish_model(path, cfg.output_dir)  # transformers pushes output_dir's copy of it
                    pusher.push(f"Training in progress, step {done}" if cfg.save_strategy == "steps"
                                else f"Training in progress, epoch {int(done / job.steps_per_epoch)}")
            stop_if_interrupted(cfg, learners, state, done, total, job.steps_per_epoch, run_dir, files, final_eval,
                                saved=saving)
        group.defer_interrupts(False)
        elapsed = time.time() - t0
        steps_run = total - state["step"]
        if job.has_eval and cfg.eval_strategy != "no" and (not eval_every or total % eval_every != 0):
            final_eval = _evaluate(job, tracker, total)
            state["log_history"].append({"step": total, "epoch": total / job.steps_per_epoch, **final_eval})
            update_best(cfg, state, final_eval, total)
        job.finish(tracker)
        mark_best_checkpoint(cfg, state, total)
        final_state = {**state, "step": total, "epoch": total / job.steps_per_epoch}
        save(cfg, learners, final_state, name=f"checkpoint-{total}", metrics=final_eval, run_id=run_dir.run_id)
        checkpoint = _checkpoint_path(cfg, total)
        # the model files (not the optimizer state) of the last checkpoint, or with
        # load_best_model_at_end of the best one, to output_dir itself
        best = state.get("best_model_checkpoint") if cfg.load_best_model_at_end else None
        if best and not _same_path(best, checkpoint):
            logger.info("load_best_model_at_end: publishing %s (%s=%s)", best, cfg.metric_for_best_model,
                        state["best_metric"])
            final_eval = best_eval(state) or final_eval  # TRL's evaluate() after train(): the best model's
        model_dir = ckpt.publish_model(best or checkpoint, cfg.output_dir)
        kept = state.get("best_model_checkpoint")
        if cfg.save_total_limit == 1 and kept and not _same_path(kept, checkpoint):
            fs, path = storage.resolve(checkpoint)  # transformers: with a limit of 1 only the best is left
            fs.delete_dir(path)
            checkpoint = kept
        throughput = {"train_runtime": elapsed,
                      "train_samples_per_second": steps_run * job.samples_per_step / max(elapsed, 1e-9),
                      "train_steps_per_second": steps_run / max(elapsed, 1e-9)}
        tracker.log(throughput, step=total)
        write_run_files(cfg, final_state, throughput, final_eval)
        tracker.close()
        progress.close()
        plot_metrics(f"{files.local_dir}/metrics.jsonl", files.local_dir, keys=job.plot_keys)
        files.sync(extra=("metrics.png", *job.log_files[1:]))
        if pusher is not None:
            pusher.push("End of training", blocking=True)
        train_logs = [h for h in state["log_history"] if "loss" in h]
        if report is not None:
            report({**_latest(state["log_history"], total), **final_eval, **throughput, "checkpoint": checkpoint,
                    **job.report_extras()})
        return {"metrics": {**(train_logs[-1] if train_logs else {}), **final_eval, **throughput},
                "model_dir": model_dir, "checkpoint": checkpoint, "total_steps": total,
                "history": state["log_history"], **job.summary()}
    finally:
        group.defer_interrupts(False)
        job.stop()


def _evaluate(job: Job, tracker: MetricsLogger, step: int) -> dict:
    metrics = job.evaluate(step)
    tracker.log(metrics, step=step)
    logger.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def update_best(cfg: TrainConfig, state: dict, metrics: dict, step: int) -> bool:
    """transformers' `Trainer._determine_best_metric`: with metric_for_best_model set, keep
    state's best_metric (and, when checkpoints are saved, best_global_step) up to date with
    this evaluation's; True when it improved."""
    if cfg.metric_for_best_model is None or not metrics:
        return False
    name = cfg.metric_for_best_model
    name = name if name.startswith("eval_") else f"eval_{name}"
    if name not in metrics:
        raise ConfigError(f"metric_for_best_model: {name!r} is not among the evaluation metrics: "
                          f"{', '.join(sorted(metrics))}")
    value = float(metrics[name])
    best = state.get("best_metric")
    if best is None:
        best = state["best_metric"] = -math.inf if cfg.greater_is_better else math.inf
    if not (value > best if cfg.greater_is_better else value < best):
        return False
    state["best_metric"] = value
    if cfg.save_strategy != "no":
        state["best_global_step"] = step
    return True


def mark_best_checkpoint(cfg: TrainConfig, state: dict, saving_step: int) -> None:
    """Before checkpoint-`saving_step` is saved: best_model_checkpoint names the checkpoint of
    best_global_step once it exists (this one included), as `Trainer._save_checkpoint` sets it."""
    step = state.get("best_global_step")
    path = _checkpoint_path(cfg, step) if step else None
    if path and (step == saving_step or storage.exists(path)):
        state["best_model_checkpoint"] = path


def best_eval(state: dict) -> dict:
    """The eval metrics logged at best_global_step (the best checkpoint's), or {}."""
    rows = [h for h in state["log_history"] if h["step"] == state.get("best_global_step")
            and any(k.startswith("eval_") for k in h)]
    return {k: v for k, v in rows[-1].items() if k not in ("step", "epoch")} if rows else {}


def _checkpoint_path(cfg: TrainConfig, step: int) -> str:
    return f"{cfg.output_dir.rstrip('/')}/checkpoint-{step}"


def _same_path(a: str, b: str) -> bool:
    return storage.resolve(a)[1].rstrip("/") == storage.resolve(b)[1].rstrip("/")


def _latest(history: list[dict], step: int) -> dict:
    """The newest value of every metric logged up to `step`, with `step` itself."""
    out: dict = {}
    for row in history:
        if row["step"] <= step:
            out.update(row)
    out["step"] = step
    return out


# ----------------------------------------------------------------------------- run mechanics


def check_run_start(cfg: TrainConfig, total_steps: int | None) -> tuple[str | None, int | None]:
    """Before Ray starts: may this job write output_dir, and what does it resume?
    Returns (the resolved checkpoint to resume, its step), or (None, None)."""
    rundir.check_output_dir(cfg)
    if not cfg.resume_from_checkpoint:
        return None, None
    return rundir.check_resume(cfg, total_steps)


def with_recovery(cfg: TrainConfig, run_dir: rundir.RunDir, resume: str | None,
                  attempt: Callable[[str | None, int], dict]) -> dict:
    """Run `attempt(resume, recoveries)`; after an actor death recreate everything through a
    new attempt from this run's last complete checkpoint (or the one it resumed from), up
    to max_failures times."""
    failures = 0
    start = resume
    while True:
        try:
            return attempt(resume, failures)
        except ActorFailure as exc:
            failures += 1
            if failures > cfg.max_failures:
                raise ActorFailure(f"{exc}; giving up after {failures} failure(s) "
                                   f"(max_failures={cfg.max_failures})") from exc
            resume = run_dir.latest_checkpoint() or start
            logger.warning("actor failure %d of max_failures=%d (%s): recreating the actor groups and "
                           "restoring from %s", failures, cfg.max_failures, exc,
                           resume or "step 0 (no resumable checkpoint yet)")


def open_tracker(cfg: TrainConfig, run_dir: rundir.RunDir, files: storage.RunFiles, step: int,
                 recoveries: int) -> MetricsLogger:
    """The run claims its output dir (its first step succeeded) and opens its metrics: lines
    past `step` (the restored step) are dropped, a recovery is logged."""
    run_dir.claim()
    tracker = MetricsLogger(files.local_dir, report_to=cfg.logging.report_to, run_name=cfg.logging.run_name,
                            project=cfg.logging.project, config_dict=ckpt.config_dict(cfg))
    tracker.truncate_after(step)
    if recoveries:
        tracker.log({"recoveries": recoveries}, step=step)
    return tracker


def save(cfg: TrainConfig, learners: ActorGroup, state: dict, *, name: str, metrics: dict, run_id: str) -> str:
    """Stage a checkpoint (weights, learner state and RNG unless save_only_model, trainer state)
    and commit it; older ones beyond save_total_limit are pruned, never the best one."""
    staging = os.path.join(staging_root(cfg), f".staging-{name}")
    shutil.rmtree(staging, ignore_errors=True)
    model_only = {"with_state": False} if cfg.save_only_model else {}
    learners.call("save", staging, **model_only, timeout=cfg.learner.collective_timeout_s)
    ckpt.save_trainer_state(staging, trainer_state(cfg, state))
    ckpt.save_run_config(staging, cfg)
    ckpt.write_model_card(staging, base_model=cfg.model_name_or_path,
                          datasets=[str(source) for source in (cfg.train_source, cfg.eval_source) if source],
                          method=type(cfg).__name__.removesuffix("Config"), metrics=metrics)
    path = ckpt.commit_checkpoint(staging, cfg.output_dir, name, step=state["step"], metadata={"run_id": run_id})
    shutil.rmtree(staging, ignore_errors=True)
    best = state.get("best_model_checkpoint")  # never pruned (transformers' rotate_checkpoints)
    ckpt.prune_checkpoints(cfg.output_dir, cfg.save_total_limit, keep=[path, *([best] if best else [])])
    return path


def trainer_state(cfg: TrainConfig, state: dict) -> dict:
    """The run's `state` (step, epoch, log_history and the facts `_attempt` adds) in
    transformers' TrainerState layout, which `TrainerState.load_from_json` loads; resume reads
    global_step and log_history back (`checkpoint.load_trainer_state`). No flops are counted:
    total_flos keeps TrainerState's default, 0."""
    from transformers import TrainerControl, TrainerState

    control = TrainerControl(should_save=True, should_training_stop=state["step"] >= state["max_steps"])
    hf = TrainerState(epoch=state["epoch"], global_step=state["step"], max_steps=state["max_steps"],
                      logging_steps=state["logging_steps"], eval_steps=state["eval_steps"],
                      save_steps=state["save_steps"], train_batch_size=cfg.per_device_train_batch_size,
                      num_train_epochs=state["num_train_epochs"], log_history=state["log_history"],
                      best_metric=state.get("best_metric"), best_global_step=state.get("best_global_step"),
                      best_model_checkpoint=state.get("best_model_checkpoint"),
                      stateful_callbacks={"TrainerControl": control.state()})
    return dataclasses.asdict(hf)


def write_run_files(cfg: TrainConfig, state: dict, throughput: dict, final_eval: dict) -> None:
    """What a TRL script leaves in output_dir after `trainer.train()`, `save_state()` and
    `save_metrics("train" / "eval")`: trainer_state.json (log_history ending with the train
    summary), train_results.json, eval_results.json (when the job evaluates), all_results.json
    (their union, written afresh: a run's results, not an earlier run's)."""
    train = {**throughput, "train_loss": train_loss(state["log_history"]), "epoch": state["epoch"]}
    state["log_history"].append({**train, "total_flos": 0.0, "step": state["step"]})
    ckpt.save_trainer_state(cfg.output_dir, trainer_state(cfg, state))
    ckpt.save_metrics(cfg.output_dir, "train", train, combined=False)
    evaluation = {**final_eval, "epoch": state["epoch"]} if final_eval else {}
    if evaluation:
        ckpt.save_metrics(cfg.output_dir, "eval", evaluation, combined=False)
    ckpt.save_metrics(cfg.output_dir, "all", {**train, **evaluation}, combined=False)


def train_loss(history: list[dict]) -> float:
    """The mean loss over the run's steps (TRL's train_loss): each logged interval average
    weighs as many steps as it covers."""
    total, steps, previous = 0.0, 0, 0
    for row in history:
        if "loss" in row:
            n = row["step"] - previous
            total, steps, previous = total + row["loss"] * n, steps + n, row["step"]
    return total / steps if steps else float("nan")


def stop_if_interrupted(cfg: TrainConfig, learners: ActorGroup, state: dict, done: int, total_steps: int,
                        steps_per_epoch: int, run_dir: rundir.RunDir, files: storage.RunFiles,
                        metrics: dict, saved: bool) -> None:
    """save_on_interrupt: after step `done`, if a signal asked the loop to stop, save
    checkpoint-`done` (unless the step just `saved` it) and raise `Interrupted`; the run can be
    resumed from it. At the last step the run simply finishes."""
    signum = group.pending_interrupt()
    if signum is None or done >= total_steps:
        return
    name = f"checkpoint-{done}"
    if not saved:
        mark_best_checkpoint(cfg, state, done)
        save(cfg, learners, {**state, "step": done, "epoch": done / steps_per_epoch}, name=name,
             metrics=metrics, run_id=run_dir.run_id)
    files.sync()
    logger.warning("stopping on %s after step %d; resume with resume_from_checkpoint: %s/%s",
                   signal.Signals(signum).name, done, cfg.output_dir.rstrip("/"), name)
    raise group.Interrupted(signum)
