"""The offline training jobs: SFT, DPO and reward models on a fixed dataset.

    rayalign dpo --config jobs/dpo-tiny.yaml          # or: rayalign sft / rayalign reward

Each step: every learner pulls gradient_accumulation_steps micro-batches from its own
Ray Data shard (streaming_split), attaches reference log-probs (precomputed columns, its
reference actor, or its adapter-off pass), and takes one DeepSpeed step; the driver
averages their metrics. Logging, evaluation, checkpoints, retries and the final save are
the run skeleton's (`rayalign.drivers.runner`). The driver holds no model.
"""

from __future__ import annotations

import logging
from typing import Callable

from rayalign.actors.group import ActorGroup, GroupSpec
from rayalign.actors.learner import PolicyLearner
from rayalign.actors.reference import Reference
from rayalign.config import DPOConfig, RewardConfig, TrainConfig
from rayalign.drivers import common, runner
from rayalign.drivers.runner import StepResult
from rayalign.tracking import average_metrics

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
    return runner.run(job_for(cfg), report=report)


def job_for(cfg: TrainConfig, eval_only: bool = False) -> "OfflineJob":
    """The job of an offline config; `eval_only`: its learners and eval batches, no training
    rows (`rayalign.drivers.offline_eval`)."""
    return (DPOJob if isinstance(cfg, DPOConfig) else OfflineJob)(cfg, eval_only)


class OfflineJob(runner.Job):
    """SFT or reward-model training: a learner group reading Ray Data shards."""

    def __init__(self, cfg: TrainConfig, eval_only: bool = False):
        self.name = job_kind(cfg)
        self.plot_keys = PLOT_KEYS[self.name]
        common.check_models(cfg)  # model dirs: files, safetensors headers, custom code, vocab size
        # paths, formats and every file's first rows, before Ray starts; prepare() tokenizes the
        # rest across the cluster and sizes the run by the rows it kept
        self.data = common.prepare_data(cfg, self.name, eval_only=eval_only)
        # eval_only: no step runs; the learners' scheduler still wants a length
        total = 1 if eval_only else (cfg.max_steps if cfg.max_steps > 0 else None)
        super().__init__(cfg, total, 1 if eval_only else None, cfg.global_batch_size)
        self.learners: ActorGroup | None = None
        self.epoch: int | None = None
        self.num_tokens: float | None = None  # the learners' running total after the last step

    def num_cpus(self) -> int | None:
        return common.local_num_cpus(self.cfg)

    def prepare(self) -> None:
        cfg = self.cfg
        self.train_ds, self.eval_batches = self.data.build(cfg)
        if self.steps_per_epoch is None:
            self.size_by_epoch(common.steps_per_epoch(self.data.num_train_rows, cfg))

    def start(self) -> ActorGroup:
        cfg = self.cfg
        self.epoch = None
        self.learners = ActorGroup(PolicyLearner, GroupSpec.of("learner", cfg.learner),
                                   args=(cfg,), placement_timeout_s=cfg.ray.placement_timeout_s,
                                   placement=common.group_placements(cfg)["learner"])
        self.learners.init_distributed(common.backend(cfg), cfg.learner.collective_timeout_s)
        info = self.learners.scatter("setup", [(self.total_steps, h) for h in self._reference_handles()])[0]
        logger.info("learners ready: %s", info)
        return self.learners

    def _reference_handles(self) -> list:
        return [None] * len(self.learners)

    def step(self, step: int) -> StepResult:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:  # a new epoch: reshuffle and hand each learner its shard
            if self.epoch is not None:
                self.learners.call("drain")
                self.data.end_epoch(self.cfg)
            self.epoch = epoch
            shards = self.train_ds(epoch).streaming_split(len(self.learners), equal=True)
            self.learners.scatter("set_data", [(s, epoch, in_epoch * self.cfg.gradient_accumulation_steps)
                                               for s in shards])
        results = self.learners.call("train_step", timeout=self.cfg.learner.collective_timeout_s)
        metrics = average_metrics(results)
        self.num_tokens = metrics.get("num_tokens", self.num_tokens)
        return StepResult(metrics)

    def log_extras(self) -> dict[str, float]:
        # num_tokens is a running total: a log line shows it after its last step, not the interval's mean
        return {} if self.num_tokens is None else {"num_tokens": self.num_tokens}

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_batches)

    def evaluate(self, step: int) -> dict[str, float]:
        return common.eval_metrics(self.learners, self.eval_batches)

    def finish(self, tracker) -> None:
        # The rest of the epoch is read only where the reference cache still needs its rows
        # scored (max_steps can end mid-epoch; reading 200k unused rows took 50 s).
        if self.data.uses_cache and not self.data.cache_complete:
            self.learners.call("drain")
            self.data.end_epoch(self.cfg)

    def stop(self) -> None:
        if self.learners is not None:
            self.learners.shutdown()
            self.learners = None


class DPOJob(OfflineJob):
    """DPO: the SFT/reward shape plus a reference (its own actor group, precomputed columns,
    the adapter-off policy, or none), TR-DPO reference syncs and generate_during_eval."""

    cfg: DPOConfig

    def __init__(self, cfg: DPOConfig, eval_only: bool = False):
        super().__init__(cfg, eval_only)
        self.references: ActorGroup | None = None
        self.cache_status = None

    def prepare(self) -> None:
        super().prepare()
        self.cache_status = ("hit" if self.data.cache_hit else "miss") if self.data.uses_cache else None

    def start(self) -> ActorGroup:
        cfg = self.cfg
        if cfg.reference_mode == "actor":
            self.references = ActorGroup(Reference, GroupSpec.of("reference", cfg.reference),
                                         args=(cfg,), placement_timeout_s=cfg.ray.placement_timeout_s,
                                         placement=common.group_placements(cfg)["reference"])
        return super().start()

    def _reference_handles(self) -> list:
        refs = self.references
        return [refs.actors[i % len(refs)] if refs else None for i in range(len(self.learners))]

    def step(self, step: int) -> StepResult:
        result = super().step(step)
        cfg = self.cfg
        if cfg.sync_ref_model and (step + 1) % cfg.ref_model_sync_steps == 0:  # TR-DPO: mix into the reference
            policy = self.learners.call("full_state_dict")[0]
            self.references.call("mix_weights", policy, cfg.ref_model_mixup_alpha)
        return result

    def finish(self, tracker) -> None:
        if self.cfg.generate_during_eval:
            common.log_generations(self.cfg, self.learners, self.references, self.data, tracker, self.total_steps)
        super().finish(tracker)

    def summary(self) -> dict:
        # reference_scoring_runtime: seconds spent scoring the train set before training
        # (precompute on a cache miss, schedule before_training; not part of train_runtime).
        return {"reference_cache": self.cache_status,
                "reference_scoring_runtime": self.data.scoring_seconds}

    def report_extras(self) -> dict:
        return {"reference_cache_hit": float(self.cache_status == "hit")}

    def stop(self) -> None:
        super().stop()
        if self.references is not None:
            self.references.shutdown()
            self.references = None
