"""The frozen reference model: an actor group of its own, or a Ray Data stage.

`Reference` answers `logprobs(batch)` for the learners in reference.mode=actor and takes
TR-DPO weight mixes (`mix_weights`). `ReferenceLogpsStage` is the callable class a Ray Data
`map_batches` actor pool runs in reference.mode=precompute: it adds `ref_chosen_logps` /
`ref_rejected_logps` columns and writes each scored block to the on-disk cache as it goes,
so training can start before the whole dataset is scored.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import torch

from rayalign import objectives, storage
from rayalign.actors.compute import on_compute_thread, use_threads
from rayalign.batch import PreferenceBatch
from rayalign.config import DPOConfig, is_adapter_dir
from rayalign.models.adapters import load_merged_adapter
from rayalign.models.loading import disable_dropout, load_causal_lm, load_tokenizer


def load_reference_model(cfg: DPOConfig) -> torch.nn.Module:
    """The frozen reference: `reference.model_name_or_path` or the policy's starting model;
    a PEFT adapter dir is loaded onto its base model and merged."""
    path = cfg.reference.model_name_or_path or cfg.model_name_or_path
    field = "reference.model_name_or_path" if cfg.reference.model_name_or_path else "model_name_or_path"
    if is_adapter_dir(path):
        model = load_merged_adapter(path, bf16=cfg.bf16, trust_remote_code=cfg.trust_remote_code, field=field)
    else:  # TRL loads its reference with the policy's model_init_kwargs
        model = load_causal_lm(path, bf16=cfg.bf16, trust_remote_code=cfg.trust_remote_code, field=field,
                               init_kwargs=cfg.model_init_kwargs)
    disable_dropout(model)
    model.eval()
    model.requires_grad_(False)
    return model


class Reference:
    """One reference-model actor: frozen weights, log-probs on request."""

    @on_compute_thread
    def __init__(self, cfg: DPOConfig, *, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        use_threads(self, max(1, int(cfg.reference.num_cpus_per_actor)))
        self.model = load_reference_model(cfg)

    def ready(self) -> bool:
        return True

    @on_compute_thread
    @torch.no_grad()
    def logprobs(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = [], []
        for part in _chunks(batch, self.cfg.reference.batch_size):
            c, r = objectives.reference_logprobs(self.model, part, self.cfg)
            chosen.append(c)
            rejected.append(r)
        return torch.cat(chosen), torch.cat(rejected)

    @on_compute_thread
    @torch.no_grad()
    def mix_weights(self, policy_state: dict[str, torch.Tensor], alpha: float) -> None:
        """TR-DPO: ref <- alpha * policy + (1 - alpha) * ref (ref_model_mixup_alpha)."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, value in policy_state.items():
            if name in params:
                target = params[name]
                target.mul_(1 - alpha).add_(value.to(target.dtype), alpha=alpha)

    @on_compute_thread
    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        from rayalign.models.generate import generate_texts

        if not hasattr(self, "tokenizer"):
            self.tokenizer = load_tokenizer(self.cfg.tokenizer_path)
        return generate_texts(self.model, self.tokenizer, prompt_ids, max_new_tokens)


class ReferenceLogpsStage:
    """Ray Data `map_batches` UDF: tokenized rows in, rows plus reference log-probs out."""

    @on_compute_thread
    def __init__(self, cfg: DPOConfig, cache_dir: str | None = None, threads: int | None = None):
        use_threads(self, threads or max(1, int(cfg.reference.num_cpus_per_actor)))
        self.cfg = cfg
        self.model = load_reference_model(cfg)
        self.pad_id = load_tokenizer(cfg.tokenizer_path).pad_token_id
        self.cache_dir = cache_dir
        if cache_dir:
            storage.makedirs(storage.join(cache_dir, "parts"))

    @on_compute_thread
    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = PreferenceBatch.from_rows(rows, self.pad_id, max_length=self.cfg.max_length,
                                          truncation_mode=self.cfg.truncation_mode)
        chosen, rejected = [], []
        for part in _chunks(batch, self.cfg.reference.batch_size):
            c, r = objectives.reference_logprobs(self.model, part, self.cfg)
            chosen.append(c)
            rejected.append(r)
        out = dict(rows)
        out["ref_chosen_logps"] = torch.cat(chosen).numpy().astype(np.float32)
        out["ref_rejected_logps"] = torch.cat(rejected).numpy().astype(np.float32)
        if self.cache_dir:
            write_cache_part(self.cache_dir, out["row_index"], out["ref_chosen_logps"],
                             out["ref_rejected_logps"])
        return out


def write_cache_part(cache_dir: str, row_index, chosen, rejected) -> None:
    """One scored block as a small Parquet file, written atomically (tmp + rename)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    table = pa.table({"row_index": np.asarray(row_index, dtype=np.int64),
                      "ref_chosen_logps": np.asarray(chosen, dtype=np.float32),
                      "ref_rejected_logps": np.asarray(rejected, dtype=np.float32)})
    name = uuid.uuid4().hex
    fs, base = storage.resolve(storage.join(cache_dir, "parts"))
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{base}/.{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, f"{base}/{name}.parquet")
    else:  # object stores publish an object only when it is fully written
        pq.write_table(table, f"{base}/{name}.parquet", filesystem=fs)


def _chunks(batch: PreferenceBatch, size: int):
    n = len(batch)
    for start in range(0, n, size):
        yield batch.select(range(start, min(n, start + size)))
