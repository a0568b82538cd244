"""On-disk cache of precomputed reference log-probs (reference.mode=precompute).

The key hashes everything that changes the numbers: the reference model's weight files
(for an adapter dir, its base model's too), the training data file(s), the tokenizer files
(chat template included), the tokenization settings and the log-prob options (ld_alpha,
dtype). A rerun or another Tune trial with the same key reuses
`<cache_root>/<key>/ref_logps.parquet`; the `complete.json` marker is written last, so a
half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from rayalign import storage
from rayalign.config import DPOConfig, is_adapter_dir
from rayalign.models.loading import adapter_base
from rayalign.stream import hash_file

MARKER = "complete.json"
TABLE = "ref_logps.parquet"


def _hash_path(h, path: str, patterns: tuple[str, ...]) -> None:
    p = Path(path)
    if p.is_file():
        hash_file(h, p)
    elif p.is_dir():
        files = sorted(f for pat in patterns for f in p.rglob(pat) if f.is_file())
        for f in files:
            hash_file(h, f)
    else:  # a hub id: its name (and revision, when pinned) is the best we can do offline
        h.update(path.encode())


def cache_key(cfg: DPOConfig, data_path: str, data_fingerprint: str | None = None) -> str:
    """A hex key identifying reference model + data + tokenizer + tokenization settings."""
    h = hashlib.sha256()
    ref_path = cfg.reference.model_name_or_path or cfg.model_name_or_path
    _hash_path(h, ref_path, ("*.safetensors", "config.json", "adapter_config.json"))
    if is_adapter_dir(ref_path):  # the reference is the adapter merged into its base model
        base = adapter_base(ref_path)
        h.update(str(base).encode())
        if base:
            _hash_path(h, base, ("*.safetensors", "config.json"))
    _hash_path(h, cfg.tokenizer_path, ("tokenizer*.json", "*.jinja", "special_tokens_map.json",
                                       "*.model", "vocab*", "merges*"))
    if data_fingerprint is not None:  # the shard set's contents (`stream.fingerprint`)
        h.update(data_fingerprint.encode())
    else:
        _hash_path(h, data_path.split(":")[0] if not os.path.exists(data_path) else data_path,
                   ("*.jsonl", "*.json", "*.csv", "*.parquet", "*.arrow"))
    settings = {
        "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
        "max_completion_length": cfg.max_completion_length, "truncation_mode": cfg.truncation_mode,
        "ld_alpha": cfg.ld_alpha, "bf16": cfg.bf16, "data": data_path, "version": 1,
    }
    if cfg.column_mapping:  # which columns are chosen / rejected changes every log-prob
        settings["column_mapping"] = cfg.column_mapping
    if cfg.model_init_kwargs:  # dtype / attention kernel change the log-probs; absent: the old keys stay valid
        settings["model_init_kwargs"] = {k: str(v) for k, v in cfg.model_init_kwargs.items()}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cache_root(cfg: DPOConfig) -> str:
    """`reference.cache_dir`, or `.rayalign_ref_cache` next to the output dir (a path or a
    URI: the cache lives on the same storage as the run, visible from every node)."""
    if cfg.reference.cache_dir:
        return cfg.reference.cache_dir
    return storage.join(storage.parent(cfg.output_dir), ".rayalign_ref_cache")


def cache_dir(cfg: DPOConfig, data_path: str, data_fingerprint: str | None = None) -> str:
    return storage.join(cache_root(cfg), cache_key(cfg, data_path, data_fingerprint))


def _read_table(path: str, columns=None):
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs, columns=columns)


def _parts(cache_dir: str) -> list[str]:
    parts_dir = storage.join(cache_dir, "parts")
    return [storage.join(parts_dir, n) for n in storage.listdir(parts_dir) if n.endswith(".parquet")]


def load_cached(cache_dir: str, num_rows: int, row_index: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """(chosen, rejected) arrays indexed by row_index, or None if absent/incomplete.
    `row_index`: the rows that must be present (default 0..num_rows-1)."""
    marker = storage.join(cache_dir, MARKER)
    if not storage.exists(marker):
        return None
    meta = json.loads(storage.read_text(marker))
    if meta.get("num_rows") != num_rows:
        return None
    table = _read_table(storage.join(cache_dir, TABLE))
    idx = table["row_index"].to_numpy()
    size = int(max(idx.max(), -1 if row_index is None else row_index.max())) + 1
    chosen = np.full(size, np.nan, dtype=np.float32)
    rejected = np.full(size, np.nan, dtype=np.float32)
    chosen[idx] = table["ref_chosen_logps"].to_numpy()
    rejected[idx] = table["ref_rejected_logps"].to_numpy()
    need = np.arange(num_rows) if row_index is None else row_index
    if np.isnan(chosen[need]).any() or np.isnan(rejected[need]).any():
        return None
    return chosen, rejected


def scored_rows(cache_dir: str) -> set[int]:
    """Row indices already scored in partial parts (written by the streaming stage)."""
    rows: set[int] = set()
    for part in _parts(cache_dir):
        rows.update(int(i) for i in _read_table(part, columns=["row_index"])["row_index"].to_numpy())
    return rows


def finalize(cache_dir: str, num_rows: int) -> bool:
    """Merge the streamed parts into one table and write the marker, if every row is there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = _parts(cache_dir)
    if not parts:
        return False
    table = pa.concat_tables([_read_table(p) for p in parts])
    idx = table["row_index"].to_numpy()
    _, first = np.unique(idx, return_index=True)  # a row scored twice (retry) keeps one copy
    table = table.take(pa.array(np.sort(first)))
    if len(table) != num_rows:
        return False
    fs, base = storage.resolve(cache_dir)
    pq.write_table(table, f"{base}/{TABLE}", filesystem=fs)  # readers wait for the marker
    storage.write_text_atomic(storage.join(cache_dir, MARKER),
                              json.dumps({"num_rows": num_rows, "created": time.time()}))
    fs.delete_dir_contents(f"{base}/parts", missing_dir_ok=True)
    return True
