"""Preference, SFT and prompt data: reading, validation, TRL-exact tokenization, Ray Data.

Formats (detected per file from its first row): standard (`prompt`, `chosen`, `rejected`
strings), conversational (message lists through the chat template; the prompt gets the
generation prompt) and implicit-prompt (only `chosen`/`rejected`: the shared prefix is the
prompt, as TRL's `extract_prompt`). SFT rows are `prompt`/`completion` or `messages`.

Tokenization follows TRL 1.16's DPOTrainer: standard completions get the eos *text*
appended when missing; prompt, prompt+chosen and prompt+rejected are tokenized whole and the
completion starts where they stop sharing a prefix. Truncation to `max_length` happens per
sequence at collation (`PreferenceBatch.from_rows`); with keep_start, rows whose prompt fills
`max_length` are bad rows (TRL drops them silently; we raise or, with `drop_bad_rows`, count).
`max_prompt_length` / `max_completion_length` are rayalign extras (TRL 0.x semantics).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

logger = logging.getLogger("rayalign")


class DataError(ValueError):
    """A bad data file or row; the message names the file, the row and the field."""


@dataclass(frozen=True)
class TokenizeSettings:
    """Truncation settings shared by every job (TRL names)."""

    max_length: int | None = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise DataError(f"truncation_mode: got {self.truncation_mode!r}; allowed: 'keep_start', 'keep_end'")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"{name}: must be >= 1 or None, got {value}")


@dataclass
class DataInfo:
    source: str
    num_rows: int
    num_dropped: int


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DataSource:
    """A dataset as a path or a `datasets.load_dataset` name, with its config and split
    (TRL ScriptArguments' dataset_name / dataset_config / dataset_*_split)."""

    path: str
    config: str | None = None
    split: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (dataset column, the name rayalign reads) renames

    def __str__(self) -> str:
        return self.path + (f"[{self.config}]" if self.config else "") + (f":{self.split}" if self.split else "")


LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(source: str | DataSource, field: str = "dataset") -> list[dict]:
    """Rows of a JSONL file, a JSON file (JSON lines or one array), a CSV file, a Parquet file
    or directory, a `save_to_disk` directory (`path:split` picks a split of a DatasetDict), or
    whatever `datasets.load_dataset(path, config, split=split)` reads: a local dataset dir of
    data files or a hub id."""
    src = source if isinstance(source, DataSource) else DataSource(source)
    rows = _read_source(src, field)
    if src.columns:
        rows = [_renamed(row, src.columns, str(src), i) for i, row in enumerate(rows)]
    return rows


def materialize(data, field: str) -> str:
    """An in-memory dataset from the Python API (`datasets.Dataset`, a list of row dicts, a
    pyarrow Table) as a Parquet file named by its content's hash, so a rerun or resume with the
    same rows names the same file (`RAYALIGN_DATA_CACHE`, default ~/.cache/rayalign/datasets)."""
    import hashlib

    import pyarrow.parquet as pq

    if isinstance(data, pa.Table):
        table = data
    elif isinstance(data, list):
        if not data:
            raise DataError(f"{field}: the list has no rows")
        table = pa.Table.from_pylist(data)
    else:
        import datasets

        if isinstance(data, datasets.DatasetDict):
            raise DataError(f"{field}: a DatasetDict holds splits {list(data)}; pass one of them")
        if not isinstance(data, datasets.Dataset):
            raise DataError(f"{field}: expected a path, a datasets.Dataset, a list of rows or a pyarrow Table, "
                            f"got {type(data).__name__}")
        table = data.with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:24]
    root = Path(os.environ.get("RAYALIGN_DATA_CACHE", os.path.expanduser("~/.cache/rayalign/datasets")))
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{digest}.parquet"
    if not path.exists():
        tmp = root / f".{digest}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return str(path)


def _renamed(row, columns: tuple[tuple[str, str], ...], source: str, index: int):
    if not isinstance(row, dict):
        return row
    out = dict(row)
    for old, new in columns:
        if old not in out:
            raise _bad(source, index, old, f"missing (column_mapping renames it to {new!r})")
        out[new] = out.pop(old)
    return out


def _read_source(src: DataSource, field: str) -> list[dict]:
    from rayalign import storage

    path, split = src.path, src.split
    if storage.is_uri(path):  # file:// reads as a local path; other stores through pyarrow
        local = storage.local_path(path)
        if local is None:
            return _read_remote(path, field)
        path = local
    if any(c in path for c in "*?[") and not os.path.exists(path):
        return _read_files(path, sorted(glob.glob(path)), field)
    if split is None and not os.path.exists(path) and ":" in path:
        path, split = path.rsplit(":", 1)
    p = Path(path)
    if not p.exists():
        if p.suffix in LOCAL_SUFFIXES or p.is_absolute() or path.startswith((".", "~")):
            raise DataError(f"{field}: file not found: {path}")
        return _load_dataset(DataSource(path, src.config, split), field)
    if p.is_file() and p.suffix in LOCAL_SUFFIXES:
        return _read_files(path, [path], field)
    if p.is_dir() and any(p.glob("*.parquet")):
        import pyarrow.parquet as pq

        return pq.read_table(str(p)).to_pylist()
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise DataError(f"{field}: {path} holds splits {list(ds)}; name one as {path}:<split>")
            ds = ds[split]
        return ds.to_list()
    if p.is_dir():
        return _load_dataset(DataSource(path, src.config, split), field)
    raise DataError(f"{field}: {path}: unknown format (expected .jsonl, .json, .csv, .parquet, a datasets "
                    "save_to_disk directory or a dataset directory load_dataset reads)")


def _parse_json(text: str, name: str, field: str) -> list[dict]:
    """JSON lines, or (as datasets' json loader also reads) one JSON array of rows."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {name}: invalid JSON array: {exc}") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {name} row {len(rows)} (line {i + 1}): invalid JSON: {exc}") from None
    return rows


def _read_remote(uri: str, field: str) -> list[dict]:
    """A data file, or a directory of data files (shards, read in name order), on any store
    pyarrow opens (s3://, gs://, hdfs://, ...)."""
    import pyarrow.fs as pafs

    from rayalign import storage

    fs, base = storage.resolve(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{field}: not found: {uri}")
    if info.type == pafs.FileType.File:
        files = [base]
    else:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base))
                       if i.type == pafs.FileType.File and Path(i.path).suffix in LOCAL_SUFFIXES)
    return _read_files(uri, files, field, fs)


def _read_files(name: str, files: list[str], field: str, fs=None) -> list[dict]:
    """Rows of data files of one format (a glob's matches or a directory's shards), in order."""
    import pyarrow.fs as pafs

    if not files:
        raise DataError(f"{field}: {name} matches no .jsonl / .json / .csv / .parquet file")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or not suffixes <= set(LOCAL_SUFFIXES):
        raise DataError(f"{field}: {name}: expected data files of one format ({', '.join(LOCAL_SUFFIXES)}), got "
                        f"{', '.join(sorted(suffixes))}")
    fs = fs or pafs.LocalFileSystem()
    rows: list[dict] = []
    for f in files:
        suffix = Path(f).suffix
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(f, filesystem=fs).to_pylist()
            continue
        with fs.open_input_stream(f) as stream:
            data = stream.read()
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            try:
                rows += pcsv.read_csv(pa.BufferReader(data)).to_pylist()
            except pa.ArrowInvalid as exc:
                raise DataError(f"{field}: {f} is not valid CSV: {exc}") from None
        else:
            rows += _parse_json(data.decode(), f, field)
    return rows


def _load_dataset(src: DataSource, field: str) -> list[dict]:
    """`datasets.load_dataset` (a local dataset dir or a hub id), a named split of it."""
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.config, split=src.split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise DataError(f"{field}: datasets.load_dataset({src.path!r}, {src.config!r}, split={src.split!r}) "
                        f"failed: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{field}: {src.path} holds splits {list(ds)}; name one (dataset_train_split / "
                            f"dataset_test_split, or {src.path}:<split>)")
        ds = next(iter(ds.values()))
    return ds.to_list()


# ----------------------------------------------------------------------------- formats


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def extract_prompt(chosen, rejected):
    """The shared prefix of chosen and rejected becomes the prompt (TRL's rule, incl. the
    space before the split point staying with the completion)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _bad(source: str, row: int, field: str, why: str) -> DataError:
    return DataError(f"{source} row {row}, field {field!r}: {why}")


def normalize_preference_row(row: dict, source: str, index: int) -> dict:
    """Check one preference row and return {prompt, chosen, rejected, conversational, margin?}."""
    if not isinstance(row, dict):
        raise _bad(source, index, "<row>", f"expected an object, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise _bad(source, index, name, "missing")
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = _is_messages(chosen)
    if "prompt" not in row or row["prompt"] is None:
        if not (isinstance(chosen, str) and isinstance(rejected, str)) and not (conversational and _is_messages(rejected)):
            raise _bad(source, index, "chosen", "implicit-prompt rows need chosen and rejected both strings or both message lists")
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise _bad(source, index, "prompt", "missing, and chosen/rejected share no prefix to extract it from")
    else:
        prompt = row["prompt"]
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if conversational:
            if not _is_messages(value):
                raise _bad(source, index, name, "expected a list of {role, content} messages like the other fields")
            if any(not isinstance(m["content"], str) for m in value):
                raise _bad(source, index, name, "message content must be a string")
        elif not isinstance(value, str):
            raise _bad(source, index, name, f"expected a string, got {type(value).__name__}")
    # An empty completion is valid, as in TRL: it trains on the eos alone (a refusal's empty
    # reply is what a harmlessness preference may prefer).
    if chosen == rejected:
        raise _bad(source, index, "rejected", "identical to chosen (no preference signal)")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "conversational": conversational}
    if row.get("margin") is not None:
        if not isinstance(row["margin"], (int, float)) or isinstance(row["margin"], bool):
            raise _bad(source, index, "margin", f"expected a number, got {row['margin']!r}")
        if not math.isfinite(row["margin"]):
            raise _bad(source, index, "margin", f"must be finite, got {row['margin']} (it is subtracted from "
                       "the reward difference in the loss)")
        out["margin"] = float(row["margin"])
    return out


def normalize_sft_row(row: dict, source: str, index: int) -> dict:
    """Check one SFT row: prompt+completion (strings or messages) or `messages`."""
    if not isinstance(row, dict):
        raise _bad(source, index, "<row>", f"expected an object, got {type(row).__name__}")
    if "messages" in row and "completion" not in row:
        messages = row["messages"]
        if not _is_messages(messages):
            raise _bad(source, index, "messages", "expected a list of {role, content} messages")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise _bad(source, index, "messages", "no assistant message to train on")
        return {"prompt": messages[:last], "completion": messages[last:], "conversational": True}
    for name in ("prompt", "completion"):
        if name not in row or row[name] is None:
            raise _bad(source, index, name, "missing")
    prompt, completion = row["prompt"], row["completion"]
    conversational = _is_messages(completion)
    for name, value in (("prompt", prompt), ("completion", completion)):
        if conversational and not _is_messages(value):
            raise _bad(source, index, name, "expected a list of {role, content} messages")
        if not conversational and not isinstance(value, str):
            raise _bad(source, index, name, f"expected a string, got {type(value).__name__}")
    return {"prompt": prompt, "completion": completion, "conversational": conversational}


# ----------------------------------------------------------------------------- tokenization


def _ids(tokenizer, value, **chat_kwargs) -> list[int]:
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _truncate_pair(prompt_ids: list[int], completions: list[list[int]], s: TokenizeSettings):
    if s.max_completion_length is not None:
        completions = [c[: s.max_completion_length] for c in completions]
    if s.max_prompt_length is not None and len(prompt_ids) > s.max_prompt_length:
        prompt_ids = (prompt_ids[-s.max_prompt_length:] if s.truncation_mode == "keep_end"
                      else prompt_ids[: s.max_prompt_length])
    return prompt_ids, completions


def tokenize_preference_row(row: dict, tokenizer, settings: TokenizeSettings, source: str = "data",
                            index: int = 0) -> dict:
    """One normalized preference row -> prompt_ids, chosen_ids, rejected_ids (TRL 1.16)."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if row["conversational"]:
        if not getattr(tokenizer, "chat_template", None):
            raise _bad(source, index, "prompt", "conversational data needs a tokenizer with a chat template")
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full_c = _ids(tokenizer, prompt + chosen)
        full_r = _ids(tokenizer, prompt + rejected)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _ids(tokenizer, prompt)
        full_c = _ids(tokenizer, prompt + chosen)
        full_r = _ids(tokenizer, prompt + rejected)
    n = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    prompt_ids, (chosen_ids, rejected_ids) = _truncate_pair(prompt_ids[:n], [full_c[n:], full_r[n:]], settings)
    if not chosen_ids or not rejected_ids:
        raise _bad(source, index, "chosen" if not chosen_ids else "rejected", "tokenizes to an empty completion")
    if (settings.max_length is not None and settings.truncation_mode == "keep_start"
            and len(prompt_ids) >= settings.max_length):
        raise _bad(source, index, "prompt", f"its {len(prompt_ids)} tokens leave no room for a completion "
                   f"within max_length={settings.max_length}")
    out = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if "margin" in row:
        out["margin"] = row["margin"]
    return out


def tokenize_sft_row(row: dict, tokenizer, settings: TokenizeSettings, source: str = "data",
                     index: int = 0) -> dict:
    """prompt_ids + completion_ids (completion ends with eos), as TRL's SFTTrainer."""
    prompt, completion = row["prompt"], row["completion"]
    if row["conversational"]:
        if not getattr(tokenizer, "chat_template", None):
            raise _bad(source, index, "prompt", "conversational data needs a tokenizer with a chat template")
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full = _ids(tokenizer, prompt + completion)
    else:
        eos = tokenizer.eos_token
        prompt_ids = _ids(tokenizer, prompt)
        full = _ids(tokenizer, prompt + (completion if completion.endswith(eos) else completion + eos))
    n = _common_prefix(prompt_ids, full)
    prompt_ids, (completion_ids,) = _truncate_pair(prompt_ids[:n], [full[n:]], settings)
    if settings.max_length is not None:
        total = prompt_ids + completion_ids
        if settings.truncation_mode == "keep_start" and len(prompt_ids) >= settings.max_length:
            raise _bad(source, index, "prompt", f"its {len(prompt_ids)} tokens leave no room for a completion "
                       f"within max_length={settings.max_length}")
        total = total[: settings.max_length] if settings.truncation_mode == "keep_start" else total[-settings.max_length:]
        keep_prompt = max(0, len(total) - len(completion_ids)) if settings.truncation_mode == "keep_end" else min(len(prompt_ids), len(total))
        prompt_ids, completion_ids = total[:keep_prompt], total[keep_prompt:]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


def prompt_text_and_ids(prompt, tokenizer) -> tuple[str, list[int]]:
    """A prompt rendered for generation (chat template with generation prompt for messages)."""
    if _is_messages(prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return text, _ids(tokenizer, prompt, add_generation_prompt=True)
    return prompt, _ids(tokenizer, prompt)


# ----------------------------------------------------------------------------- validation + Ray


def _normalize_all(rows: list[dict], kind: str, source: str, drop_bad_rows: bool) -> tuple[list[dict], int]:
    norm = normalize_sft_row if kind == "sft" else normalize_preference_row
    out, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            clean = norm(row, source, i)
        except DataError as exc:
            if not drop_bad_rows:
                raise
            dropped += 1
            logger.warning("dropping bad row: %s", exc)
            continue
        clean["row_index"] = i
        out.append(clean)
    _check_margins(out, source)
    return out, dropped


def _check_margins(rows: list[dict], source: str) -> None:
    """A margin on some rows only would be dropped for every batch that mixes them (a batch
    carries a margin only when all its rows have one): refuse, naming the rows without."""
    missing = [r["row_index"] for r in rows if "margin" not in r]
    if missing and len(missing) < len(rows):
        raise DataError(f"{source}: field 'margin' is set on {len(rows) - len(missing)} rows but missing (or null) on "
                        f"{len(missing)}, e.g. rows {missing[:5]}: give every row a margin, or none")


def validate_file(path: str | DataSource, tokenizer, settings: TokenizeSettings, *, kind: str = "preference",
                  drop_bad_rows: bool = False, field: str = "train_dataset") -> tuple[pa.Table, DataInfo]:
    """Read, check and tokenize every row on the driver, before any Ray or model work, so a
    bad row fails the run at once with its file, row and field. Returns the tokenized rows
    (the same columns `TokenizeStage` produces) and counts."""
    rows = read_rows(path, field)
    if not rows:
        raise DataError(f"{field}: {path} has no rows")
    clean, dropped = _normalize_all(rows, kind, path, drop_bad_rows)
    tok_fn = tokenize_sft_row if kind == "sft" else tokenize_preference_row
    out = []
    for row in clean:
        try:
            out.append({"row_index": row["row_index"], **tok_fn(row, tokenizer, settings, path, row["row_index"])})
        except DataError as exc:
            if not drop_bad_rows:
                raise
            dropped += 1
            logger.warning("dropping bad row: %s", exc)
    if not out:
        raise DataError(f"{field}: {path}: every row is bad ({dropped} dropped)")
    if dropped:
        logger.warning("%s: %s: dropped %d of %d rows (drop_bad_rows=true)", field, path, dropped, len(rows))
    return pa.Table.from_pylist(out, schema=_token_schema(kind)), DataInfo(str(path), len(out), dropped)


def drop_over_length(table: pa.Table, max_length: int, path: str, field: str) -> pa.Table:
    """Reward data, as TRL 1.16's RewardTrainer prepares it: a pair whose chosen or rejected
    sequence (prompt included) is longer than `max_length` is dropped, not truncated (a score
    read at a cut-off position would rank a sequence nobody wrote)."""
    import pyarrow.compute as pc

    prompt = pc.list_value_length(table["prompt_ids"])
    longest = pc.max_element_wise(pc.list_value_length(table["chosen_ids"]),
                                  pc.list_value_length(table["rejected_ids"]))
    keep = pc.less_equal(pc.add(prompt, longest), max_length)
    kept = table.filter(keep)
    dropped = table.num_rows - kept.num_rows
    if not kept.num_rows:
        raise DataError(f"{field}: {path}: every pair is longer than max_length={max_length} tokens "
                        f"(reward data is filtered, as TRL's RewardTrainer does); raise max_length")
    if dropped:
        logger.warning("%s: %s: dropped %d of %d pairs longer than max_length=%d tokens (as TRL's "
                       "RewardTrainer)", field, path, dropped, table.num_rows, max_length)
    return kept


class TokenizeStage:
    """Ray Data `map_batches` UDF: normalized rows (as JSON text) in, token ids out.
    Loads the tokenizer once per worker."""

    def __init__(self, tokenizer_path: str, settings: TokenizeSettings, kind: str, source: str,
                 drop_bad_rows: bool):
        from rayalign.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.settings = settings
        self.kind = kind
        self.source = source
        self.drop = drop_bad_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        tok_fn = tokenize_sft_row if self.kind == "sft" else tokenize_preference_row
        out = []
        for rec in batch.to_pylist():
            row = json.loads(rec["row"])
            try:
                tokens = tok_fn(row, self.tokenizer, self.settings, self.source, rec["row_index"])
            except DataError:
                if self.drop:
                    continue
                raise
            out.append({"row_index": rec["row_index"], **tokens})
        return pa.Table.from_pylist(out, schema=_token_schema(self.kind))


def _token_schema(kind: str) -> pa.Schema:
    ids = pa.list_(pa.int64())
    if kind == "sft":
        return pa.schema([("row_index", pa.int64()), ("prompt_ids", ids), ("completion_ids", ids)])
    return pa.schema([("row_index", pa.int64()), ("prompt_ids", ids), ("chosen_ids", ids),
                      ("rejected_ids", ids), ("margin", pa.float64())])


def _load(path: str, tokenizer_path: str, settings: TokenizeSettings, kind: str, drop_bad_rows: bool):
    import ray

    rows = read_rows(path)
    clean, dropped = _normalize_all(rows, kind, path, drop_bad_rows)
    # Rows travel as JSON text: message lists and strings keep their exact Python shape.
    table = pa.table({"row_index": [r["row_index"] for r in clean],
                      "row": [json.dumps(r) for r in clean]})
    blocks = max(1, min(8, len(clean) // 256))
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(TokenizeStage, fn_constructor_kwargs={
        "tokenizer_path": tokenizer_path, "settings": settings, "kind": kind, "source": path,
        "drop_bad_rows": drop_bad_rows}, batch_format="pyarrow", compute=_actor_pool(), num_cpus=0.5)
    return ds, DataInfo(path, len(clean), dropped)


def _actor_pool():
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=1)


def load_preference_dataset(path: str, tokenizer_path: str, settings: TokenizeSettings, *,
                            drop_bad_rows: bool = False):
    """A lazy Ray Dataset of tokenized preference rows and its DataInfo."""
    return _load(path, tokenizer_path, settings, "preference", drop_bad_rows)


BAD_PROMPT = "expected a non-empty string or a list of messages"


def row_prompt(row) -> str | list | None:
    """A prompt-only row's `prompt` (a non-empty string or a message list), else None: the
    one rule online DPO's and eval's prompt files are checked by."""
    prompt = row.get("prompt") if isinstance(row, dict) else None
    return prompt if (isinstance(prompt, str) and prompt.strip()) or _is_messages(prompt) else None


def load_prompts(path: str, field: str = "prompts") -> list:
    """Prompt-only rows (`prompt`: string or messages) as a list, checked."""
    prompts = []
    for i, row in enumerate(read_rows(path, field)):
        if (prompt := row_prompt(row)) is None:
            raise _bad(path, i, "prompt", BAD_PROMPT)
        prompts.append(prompt)
    return prompts


def load_prompt_rows(path: str | DataSource, tokenizer, field: str = "train_dataset",
                     drop_bad_rows: bool = False) -> tuple[list[dict], int]:
    """Prompt-only rows for online jobs: each row keeps its columns (reward functions get
    them, TRL-style) plus `prompt_ids` (chat template with generation prompt for message
    lists). Bad rows raise naming file/row/field, or are dropped and counted."""
    rows, dropped = [], 0
    for i, row in enumerate(read_rows(path, field)):
        if (prompt := row_prompt(row)) is None:
            if drop_bad_rows:
                dropped += 1
                continue
            raise _bad(f"{field}: {path}", i, "prompt", BAD_PROMPT)
        rows.append({**row, "prompt_ids": prompt_text_and_ids(prompt, tokenizer)[1]})
    if not rows:
        raise DataError(f"{field}: {path} has no usable prompt rows ({dropped} dropped)")
    return rows, dropped
