"""A model's DPO or reward-model eval metrics without training: TRL's `trainer.evaluate()`.

    rayalign eval-dpo    --config jobs/dpo-tiny.yaml --model_name_or_path outputs/dpo-tiny
    rayalign eval-reward --config jobs/reward-tiny.yaml --model_name_or_path outputs/reward-tiny

The job's own config (DPOConfig / RewardConfig). model_name_or_path may be a model dir, a
run's output_dir or one of its checkpoint-N dirs; for the latter two `epoch` is the run's,
and a DPO policy is scored against the reference the run started from (unless
reference.model_name_or_path is set), as `trainer.evaluate()` after `train()` would. The rows
are eval_dataset (else dataset_name's dataset_test_split, else the training rows), in
per_device_eval_batch_size batches. The learners (and the reference) start as for training
and run the offline job's own evaluation (`OfflineJob.evaluate`: the eval_* metrics a training
run logs, averaged as TRL averages them). The metrics go to `<output_dir>/eval_results.json`
and are merged into `all_results.json` (`Trainer.save_metrics("eval", metrics)`); no step
runs, and besides these two files only a precompute reference cache is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import yaml

from rayalign import checkpoint as ckpt
from rayalign import storage
from rayalign.actors.group import ensure_ray
from rayalign.config import DPOConfig, TrainConfig
from rayalign.drivers import offline

logger = logging.getLogger("rayalign")


def evaluate(cfg: TrainConfig) -> dict[str, float]:
    """eval_* metrics of cfg.model_name_or_path on the eval rows (see the module docstring);
    also written to output_dir as eval_results.json / all_results.json."""
    cfg = eval_config(cfg)
    job = offline.job_for(cfg, eval_only=True)  # checks the models and every row before Ray starts
    ensure_ray(cfg.ray.address, job.num_cpus(), cfg.ray.namespace)
    job.prepare()
    try:
        job.start()
        metrics = job.evaluate(0)
    finally:
        job.stop()
    metrics["epoch"] = trained_epochs(cfg.model_name_or_path)  # Trainer.log adds the state's epoch
    logger.info("eval of %s on %s: %s", cfg.model_name_or_path, job.data.eval_path,
                {k: round(v, 4) for k, v in metrics.items()})
    ckpt.save_metrics(cfg.output_dir, "eval", metrics)
    return metrics


def eval_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` as evaluation runs it: a DPO policy that rayalign trained is scored against the
    reference its run started from, unless reference.model_name_or_path says otherwise."""
    if isinstance(cfg, DPOConfig) and cfg.reference_mode in ("actor", "precompute") \
            and not cfg.reference.model_name_or_path:
        start = run_reference(cfg.model_name_or_path)
        if start:
            logger.info("reference: %s, the reference of the run that trained %s (its rayalign_config.yaml); "
                        "set reference.model_name_or_path to score against another", start, cfg.model_name_or_path)
            return dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, model_name_or_path=start))
    return cfg


def trained_epochs(model_dir: str) -> float:
    """The epoch a rayalign run's output_dir or checkpoint was saved at (its
    trainer_state.json); 0 for any other model, as for TRL's trainer before `train()`."""
    path = storage.join(model_dir, "trainer_state.json")
    if not storage.exists(path):
        return 0.0
    return float(json.loads(storage.read_text(path)).get("epoch") or 0.0)


def run_reference(model_dir: str) -> str | None:
    """The reference model of the DPO run whose output_dir or checkpoint `model_dir` is (read
    from the rayalign_config.yaml saved beside its weights); None for any other model. TRL's
    `trainer.evaluate()` after `train()` scores against the same one."""
    path = storage.join(model_dir, "rayalign_config.yaml")
    if not storage.exists(path):
        return None
    run = yaml.safe_load(storage.read_text(path)) or {}
    if not isinstance(run.get("reference"), dict):  # an SFT or reward run: its model has no DPO reference
        return None
    return run["reference"].get("model_name_or_path") or run.get("model_name_or_path") or None
