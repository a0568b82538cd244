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

import json
import logging
import math
import os
import pickle
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
    or directory, a glob or URI of such shards, a `save_to_disk` directory (`path:split` picks
    a split of a DatasetDict), or whatever `datasets.load_dataset(path, config, split=split)`
    reads: a local dataset dir of data files or a hub id. All of it, in this process: for
    small files (prompts, eval sets); training data is read by `rayalign.stream`."""
    from rayalign import stream

    return [row for piece in stream.plan(source, field) for row in stream.read_piece(piece, field)]


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


def validate_file(path: str | DataSource, tokenizer, settings: TokenizeSettings, *, kind: str = "preference",
                  drop_bad_rows: bool = False, field: str = "train_dataset",
                  reward_max_length: int | None = None) -> tuple[pa.Table, DataInfo]:
    """Read, check and tokenize every row in this process: the table `stream.tokenize` builds
    across the cluster (same rows, row_index and errors), for small data and for tests."""
    from rayalign import stream

    table, dropped = stream.tokenize_local(stream.plan(path, field), tokenizer, settings, kind=kind,
                                           drop_bad_rows=drop_bad_rows, field=field,
                                           reward_max_length=reward_max_length)
    return table, DataInfo(str(path), table.num_rows, dropped)


def _token_schema(kind: str) -> pa.Schema:
    ids = pa.list_(pa.int64())
    if kind == "sft":
        return pa.schema([("row_index", pa.int64()), ("prompt_ids", ids), ("completion_ids", ids)])
    if kind == "prompt":
        return pa.schema([("row_index", pa.int64()), ("prompt_ids", ids), ("row", pa.binary())])
    return pa.schema([("row_index", pa.int64()), ("prompt_ids", ids), ("chosen_ids", ids),
                      ("rejected_ids", ids), ("margin", pa.float64())])


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


def normalize_prompt_row(row, source: str, index: int) -> dict:
    """Check one prompt-only row (online DPO); it keeps every column as read."""
    if row_prompt(row) is None:
        raise _bad(source, index, "prompt", BAD_PROMPT)
    return row


def tokenize_prompt_row(row: dict, tokenizer, settings: TokenizeSettings, source: str = "data",
                        index: int = 0) -> dict:
    """prompt_ids (chat template with generation prompt for message lists; not truncated) and
    the row itself, pickled, so reward functions get its columns (TRL-style) exactly as read:
    an Arrow column would refuse a string prompt in one row and messages in the next, and
    would give each message every key any message has. (Pickle only carries rows from this
    job's tasks to its driver, through the object store; no file holds them.)"""
    if _is_messages(row["prompt"]) and not getattr(tokenizer, "chat_template", None):
        raise _bad(source, index, "prompt", "conversational data needs a tokenizer with a chat template")
    return {"prompt_ids": prompt_text_and_ids(row["prompt"], tokenizer)[1], "row": pickle.dumps(row)}


def prompt_rows(batch: pa.Table) -> list[dict]:
    """A batch of tokenized prompt rows (`tokenize_prompt_row`'s table) as the rows rollouts,
    reward functions and judges get: the columns as read, plus prompt_ids (a list of ints)."""
    return [{**pickle.loads(row), "prompt_ids": ids}
            for row, ids in zip(batch.column("row").to_pylist(), batch.column("prompt_ids").to_pylist())]
