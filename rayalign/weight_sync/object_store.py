"""The `object_store` weight-sync channel: learner rank 0 puts the state dict into Ray's
object store once, every rollout actor loads it from there (`update_weights`)."""

from __future__ import annotations

import time

from rayalign.weight_sync.base import WeightChannel, WeightExport, WeightSyncError


class ObjectStoreChannel(WeightChannel):
    def _transfer(self, version: int) -> tuple[WeightExport, list, float]:
        rcfg = self.cfg.rollout
        t = time.time()
        export = self.learners.call("export_weights", self.probe, timeout=self.cfg.learner.collective_timeout_s)[0]
        t_export = time.time() - t
        refs = [a.update_weights.remote(export.state, version, self.probe) for a in self.rollouts.actors]
        try:
            loaded = self.rollouts.get(refs, rcfg.weight_sync_timeout_s)
        except TimeoutError as exc:
            raise WeightSyncError(f"rollout: pushing weight version {version} to {len(refs)} actor(s) did not "
                                  f"finish within rollout.weight_sync_timeout_s={rcfg.weight_sync_timeout_s}s"
                                  ) from exc
        return export, loaded, t_export
