"""The weight-sync interface: how the learner's weights reach every rollout engine.

A channel is one module in `rayalign/weight_sync/` with a `WeightChannel` subclass, listed
in `CHANNELS` (rayalign/weight_sync/__init__.py). It implements `_transfer` (export from
the learners, load into the engines); `WeightChannel.push` times it, checks what every
engine loaded against what the learner exported (fingerprint and probe log-probs) and
appends one line per push to `<output_dir>/weight_sync.jsonl`: the version, the learner's
fingerprint and each engine's, the probe log-prob gap and the seconds taken — an audit
trail of which weights sampled every step.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from rayalign.models import weights as weights_lib


class WeightSyncError(RuntimeError):
    """A weight push failed, timed out, or left an engine with weights unlike the learner's."""


@dataclass(frozen=True)
class WeightExport:
    """What learner rank 0 hands out for one push (`export_weights` / `prepare_weights`):
    the fingerprint of the weights, the probe log-probs under them, the tensor count, and
    either the state dict in Ray's object store (`state`) or the tensors' metadata (`meta`:
    name, dtype, shape in send order) for a broadcast."""

    fingerprint: dict[str, float]
    probe: list[float] | None
    num_tensors: int
    state: Any = None  # ray.ObjectRef of the state dict (object store)
    meta: list[dict] | None = None  # nccl


class WeightChannel(ABC):
    """Pushes the learner's weights to every rollout actor and checks what they loaded."""

    def __init__(self, cfg, learners, rollouts, info_vocab: int, log_dir: str | None = None):
        self.cfg = cfg
        self.learners = learners
        self.rollouts = rollouts
        self.version = -1
        self.probe = weights_lib.probe_ids(info_vocab) if cfg.rollout.verify_weights else None
        # None until the run owns its output dir: records wait in memory (log_to)
        self.log_path = os.path.join(log_dir, "weight_sync.jsonl") if log_dir else None
        self._pending: list[str] = []

    @abstractmethod
    def _transfer(self, version: int) -> tuple[WeightExport, list, float]:
        """Export from the learners and load into every engine: (the export, each engine's
        `LoadResult` in actor order, seconds the export took)."""

    def push(self, version: int) -> dict[str, float]:
        """Send the learner's current weights as `version`; returns the sync metrics."""
        t = time.time()
        export, loaded, t_export = self._transfer(version)
        seconds = time.time() - t
        metrics = {"sync/weight_sync_s": seconds, "sync/export_s": t_export}
        if self.cfg.rollout.verify_weights:
            metrics.update(self.verify(export, loaded, version))
        self.version = version
        self._pending.append(json.dumps({"version": version, "seconds": seconds, "export_s": t_export,
                                         "learner": export.fingerprint,
                                         "rollouts": [x.fingerprint for x in loaded],
                                         "probe_max_abs_diff": metrics.get("sync/probe_max_abs_diff")}))
        self._flush()
        return metrics

    def verify(self, export: WeightExport, loaded: list, version: int) -> dict[str, float]:
        for item in loaded:
            if item.version != version:
                raise WeightSyncError(f"rollout {item.rank}: reports version {item.version} after a push of "
                                      f"version {version}")
            if not weights_lib.fingerprints_match(item.fingerprint, export.fingerprint):
                raise WeightSyncError(f"rollout {item.rank}: loaded weights differ from the learner's at version "
                                      f"{version}: {item.fingerprint} != {export.fingerprint}")
        # each engine's probe log-probs came back with its load (the same call, no extra round trip)
        worst = max(max(abs(a - b) for a, b in zip(item.probe, export.probe)) for item in loaded)
        if worst > self.cfg.rollout.probe_tolerance:
            raise WeightSyncError(f"rollout engines compute log-probs up to {worst:.2e} away from the learner's "
                                  f"after the push of version {version} (rollout.probe_tolerance="
                                  f"{self.cfg.rollout.probe_tolerance}): the engine is not using the pushed weights")
        return {"sync/probe_max_abs_diff": float(worst)}

    def before_train(self) -> None:
        """Called before each train step (after generation): a colocated channel lets its
        engines free the GPU here. Default: nothing."""

    def log_to(self, log_dir: str) -> None:
        """Start appending the audit trail to `<log_dir>/weight_sync.jsonl` (pushes so far too)."""
        self.log_path = os.path.join(log_dir, "weight_sync.jsonl")
        self._flush()

    def _flush(self) -> None:
        if self.log_path is None or not self._pending:
            return
        with open(self.log_path, "a") as f:
            f.write("".join(line + "\n" for line in self._pending))
        self._pending = []

    def close(self) -> None:
        """Release what the channel holds beyond the actors (records still pending are written)."""
        self._flush()
