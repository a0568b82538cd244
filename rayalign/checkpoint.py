"""Crash-safe checkpoints in Hugging Face layout, on a local path or a pyarrow URI.

A checkpoint directory `<output_dir>/checkpoint-<step>/` holds:

    model.safetensors, config.json, generation_config.json, tokenizer files, README.md
        (or adapter_model.safetensors + adapter_config.json for LoRA; a sharded save:
        model.safetensors.index.json + the model-0000i-of-0000n.safetensors it names)
    rayalign_config.yaml      the run config, as text (never a pickle)
    trainer_state.json        transformers' TrainerState layout (global_step, epoch, log_history, ...);
                              the step also fixes the data position
    rng_state_<rank>.json / .safetensors   python/numpy/torch RNG states per rank
    learner_state/shared.json / .safetensors   trainable weights, scheduler and engine
                              counters (rank 0), and the optimizer when it is replicated (ZeRO-0)
    learner_state/rank_<rank>.json / .safetensors   each rank's ZeRO optimizer partition
                              (no rng_state / learner_state with save_only_model: not resumable)
    rayalign_complete.json    the completion marker, written last

Nothing in a checkpoint is a pickle: state is written with `save_state` (tensors in
safetensors, the structure around them in JSON) and read back with `load_state`, which
never imports or calls anything named in the file. Checkpoints of older rayalign versions
(DeepSpeed's pickled `deepspeed/*.pt`) are refused by `check_resumable`.

Learners write into a local staging directory; `commit_checkpoint` publishes it: on a
local filesystem by renaming a `.tmp-*` directory into place (atomic), elsewhere by
uploading with the marker last (the marker is the commit point on object stores). A
checkpoint without a valid marker is never loaded; `latest` falls back past it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from rayalign import storage

logger = logging.getLogger("rayalign")

MARKER = "rayalign_complete.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
               "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
               "added_tokens.json", "README.md", "rayalign_config.yaml")
WEIGHT_INDEX = "model.safetensors.index.json"
# save_pretrained's shards past max_shard_size (save_max_shard_size): model-00001-of-00003.safetensors
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
WEIGHT_FILES = ("model.safetensors", WEIGHT_INDEX, "adapter_model.safetensors")


LEARNER_STATE = "learner_state"
_LEGACY_STATE = "deepspeed"  # older rayalign: engine.save_checkpoint's pickles
STATE_FORMAT = "rayalign-state-v1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or not loadable; the message names it."""


_fs = storage.resolve


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _file_list(local_dir: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(local_dir):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, local_dir)] = os.path.getsize(p)
    return out


def commit_checkpoint(local_dir: str, output_dir: str, name: str, *, step: int,
                      metadata: dict | None = None) -> str:
    """Publish `local_dir` as `<output_dir>/<name>` atomically; returns its path/URI."""
    fs, base = _fs(output_dir)
    files = _file_list(local_dir)
    marker = {"step": step, "time": time.time(), "files": files, **(metadata or {})}
    final = _join(base, name)
    if _is_local(fs):
        os.makedirs(base, exist_ok=True)
        tmp = _join(base, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        if os.path.dirname(os.path.abspath(local_dir)) == base:
            os.replace(local_dir, tmp)  # staged next to the output: a rename, no copy
        else:
            shutil.copytree(local_dir, tmp)
        Path(tmp, MARKER).write_text(json.dumps(marker))
        if os.path.exists(final):  # re-save of the same step: swap, then delete the old one
            old = _join(base, f".tmp-old-{name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return final
    fs.create_dir(final, recursive=True)
    for rel in files:
        dest = _join(final, rel)
        fs.create_dir(os.path.dirname(dest), recursive=True)
        pafs.copy_files(os.path.join(local_dir, rel), dest, destination_filesystem=fs)
    with fs.open_output_stream(_join(final, MARKER)) as f:
        f.write(json.dumps(marker).encode())
    return storage.join(output_dir, name)


def verify_checkpoint(path: str) -> dict:
    """Raise CheckpointError unless `path` has a marker and every listed file at its size."""
    fs, p = _fs(path)
    try:
        with fs.open_input_stream(_join(p, MARKER)) as f:
            marker = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER}; the save did not finish)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: damaged completion marker: {exc}") from exc
    infos = {i.path: i for i in fs.get_file_info([_join(p, rel) for rel in marker.get("files", {})])}
    for rel, size in marker.get("files", {}).items():
        info = infos[_join(p, rel)]
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"{path}: file {rel} listed in {MARKER} is missing")
        if info.size != size:
            raise CheckpointError(f"{path}: file {rel} is {info.size} bytes, expected {size} (damaged)")
    return marker


def check_resumable(path: str) -> dict:
    """verify_checkpoint, then CheckpointError unless `path` holds rayalign's pickle-free
    learner state; a checkpoint of an older rayalign (optimizer state in DeepSpeed's pickled
    `deepspeed/*.pt`) is refused, never unpickled. Returns the marker. Drivers call it before
    Ray starts; learners call it again before they read anything."""
    marker = verify_checkpoint(path)
    files = marker.get("files", {})
    if f"{LEARNER_STATE}/shared.json" in files:
        return marker
    if any(rel.startswith(f"{_LEGACY_STATE}/") for rel in files):
        raise CheckpointError(
            f"{path}: written by an older rayalign version, whose optimizer state is in DeepSpeed's pickle "
            f"format ({_LEGACY_STATE}/*.pt). Unpickling a file can run arbitrary code, so this checkpoint will "
            f"not be loaded. To continue from its weights, start a new run with model_name_or_path={path}.")
    raise CheckpointError(f"{path}: no learner state ({LEARNER_STATE}/shared.json): it holds model weights "
                          "only (a save_only_model=true checkpoint, which transformers cannot resume either) and "
                          "cannot be resumed; start a new run from its weights with model_name_or_path instead")


def is_resumable(path: str) -> bool:
    """A complete checkpoint with learner state (not a save_only_model one)."""
    try:
        check_resumable(path)
        return True
    except CheckpointError:
        return False


def is_complete(path: str) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    fs, base = _fs(output_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except FileNotFoundError:
        return []
    out = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint-") and name[11:].isdigit():
            out.append((int(name[11:]), output_dir.rstrip("/") + "/" + name))
    return sorted(out)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete `checkpoint-<step>` directories, oldest first (marker present)."""
    out = []
    for step, path in _checkpoint_dirs(output_dir):
        fs, p = _fs(path)
        if fs.get_file_info(_join(p, MARKER)).type == pafs.FileType.File:
            out.append((step, path))
    return out


def resolve_checkpoint(output_dir: str, spec: str) -> str:
    """A checkpoint path, or for "latest" the newest complete and undamaged one."""
    if spec != "latest":
        verify_checkpoint(spec)
        return spec
    for step, path in reversed(_checkpoint_dirs(output_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
    raise CheckpointError(f"resume_from_checkpoint=latest: no complete checkpoint in {output_dir}")


def prune_checkpoints(output_dir: str, save_total_limit: int | None, keep: list[str] | None = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond the limit and stale `.tmp-*` dirs."""
    fs, base = _fs(output_dir)
    removed = []
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except FileNotFoundError:
        infos = []
    for info in infos:
        if info.type == pafs.FileType.Directory and info.base_name.startswith(".tmp-"):
            fs.delete_dir(info.path)
            removed.append(info.path)
    if save_total_limit:
        keep_set = {os.path.abspath(k) if "://" not in k else k for k in (keep or [])}
        complete = list_checkpoints(output_dir)
        excess = len(complete) - save_total_limit
        for _, path in complete:
            if excess <= 0:
                break
            norm = os.path.abspath(path) if "://" not in path else path
            if norm in keep_set:
                continue
            fs.delete_dir(_fs(path)[1])
            removed.append(path)
            excess -= 1
    return removed


def download_checkpoint(path: str, local_root: str) -> str:
    """A local copy of a remote checkpoint (local paths are returned as they are)."""
    fs, p = _fs(path)
    if _is_local(fs):
        return p
    dest = os.path.join(local_root, f".download-{os.path.basename(p.rstrip('/'))}")
    shutil.rmtree(dest, ignore_errors=True)
    verify_checkpoint(path)  # complete and undamaged before anything is copied
    os.makedirs(dest)
    pafs.copy_files(p, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def model_files(directory: str) -> list[str]:
    """The model files (MODEL_FILES) a model dir or checkpoint holds, with every shard its
    `model.safetensors.index.json` names (a local path or a URI)."""
    fs, p = _fs(directory)
    infos = fs.get_file_info([_join(p, name) for name in MODEL_FILES])
    names = [name for name, info in zip(MODEL_FILES, infos) if info.type == pafs.FileType.File]
    if WEIGHT_INDEX in names:
        with fs.open_input_stream(_join(p, WEIGHT_INDEX)) as f:
            index = json.loads(f.read().decode())
        shards = sorted(set(index.get("weight_map", {}).values()))
        bad = [s for s in shards if not SHARD.fullmatch(s)]
        if bad:
            raise CheckpointError(f"{directory}: {WEIGHT_INDEX} names shards outside save_pretrained's layout: {bad}")
        names += shards
    return names


def publish_model(checkpoint_path: str, output_dir: str) -> str:
    """Copy a checkpoint's model files (not optimizer state; every shard of a sharded save)
    into `output_dir` itself, each file replaced atomically, then remove weight files of an
    earlier publish that this model lacks (a sharded model over an unsharded one), so
    output_dir loads with from_pretrained."""
    src_fs, src = _fs(checkpoint_path)
    dst_fs, dst = _fs(output_dir)
    names = model_files(checkpoint_path)
    for name in names:
        tmp = _join(dst, f".{name}.tmp")
        pafs.copy_files(_join(src, name), tmp, source_filesystem=src_fs, destination_filesystem=dst_fs)
        dst_fs.move(tmp, _join(dst, name))
    for info in dst_fs.get_file_info(pafs.FileSelector(dst, allow_not_found=True)):
        stale = info.base_name in WEIGHT_FILES or SHARD.fullmatch(info.base_name)
        if stale and info.base_name not in names and info.type == pafs.FileType.File:
            dst_fs.delete_file(info.path)
    return output_dir


# ----------------------------------------------------------------------------- text files


def write_model_card(directory: str, *, base_model: str, datasets: list[str], method: str,
                     metrics: dict | None = None, library: str = "transformers") -> None:
    """A Hugging Face model card naming base model, data, method and final metrics."""
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                     for k, v in sorted((metrics or {}).items()))
    card = f"""---
base_model: {base_model}
library_name: {library}
tags:
- rayalign
- {method.lower()}
---

# Model trained with rayalign ({method})

* Base model: `{base_model}`
* Method: {method}
* Data: {', '.join(f'`{d}`' for d in datasets)}

## Final evaluation metrics

| metric | value |
|---|---|
{rows or '| (none) | |'}

Trained with [rayalign](https://github.com/rayalign/rayalign); the run config is in
`rayalign_config.yaml`.
"""
    Path(directory, "README.md").write_text(card)


def config_dict(cfg) -> dict:
    """`to_dict(cfg)` as it may be written to files and trackers: without hub_token (as
    transformers' TrainingArguments.to_dict masks its *_token fields)."""
    from rayalign.config import to_dict

    out = to_dict(cfg)
    if out.get("hub_token") is not None:
        out["hub_token"] = None
    return out


def save_run_config(directory: str, cfg) -> None:
    import yaml

    Path(directory, "rayalign_config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))


def save_trainer_state(directory: str, state: dict) -> None:
    """`<directory>/trainer_state.json` (a local path or a URI), formatted as
    TrainerState.save_to_json formats it."""
    text = json.dumps(state, indent=2, sort_keys=True, default=float) + "\n"
    storage.write_text_atomic(storage.join(directory, "trainer_state.json"), text)


def state_step(state: dict) -> int:
    """The step a trainer_state.json holds: transformers' `global_step`, or `step` in the
    files of older rayalign versions."""
    return int(state.get("global_step", state.get("step", 0)))


def load_trainer_state(directory: str) -> dict:
    """A checkpoint's trainer state (either layout), with its step under `step`."""
    path = Path(directory, "trainer_state.json")
    if not path.exists():
        raise CheckpointError(f"{directory}: no trainer_state.json (not a training checkpoint)")
    state = json.loads(path.read_text())
    return {**state, "step": state_step(state)}


def save_metrics(output_dir: str, split: str, metrics: dict, *, combined: bool = True) -> None:
    """`<split>_results.json`, and with `combined` the same metrics merged into
    `all_results.json`, as transformers' `Trainer.save_metrics` writes them (a local path or
    a URI)."""
    def write(name: str, values: dict) -> None:
        storage.write_text_atomic(storage.join(output_dir, name),
                                  json.dumps(values, indent=4, sort_keys=True, default=float))

    write(f"{split}_results.json", metrics)
    if combined:
        path = storage.join(output_dir, "all_results.json")
        merged = json.loads(storage.read_text(path)) if storage.exists(path) else {}
        write("all_results.json", {**merged, **metrics})


def save_rng_state(directory: str, rank: int) -> None:
    """Python, numpy and torch RNG states without pickle (JSON + safetensors)."""
    from safetensors.torch import save_file

    py_state = random.getstate()
    np_state = np.random.get_state()
    Path(directory, f"rng_state_{rank}.json").write_text(json.dumps({
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(Path(directory, f"rng_state_{rank}.safetensors")))


def load_rng_state(directory: str, rank: int) -> None:
    from safetensors.torch import load_file

    path = Path(directory, f"rng_state_{rank}.json")
    if not path.exists():
        return
    state = json.loads(path.read_text())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    tensors = load_file(str(Path(directory, f"rng_state_{rank}.safetensors")))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ----------------------------------------------------------------------------- state without pickle


@dataclasses.dataclass
class SavedObject:
    """An object met in saved state (e.g. DeepSpeed's loss scaler), kept as its class name
    and plain attributes. Loading never imports or builds it: `restore_objects` writes the
    attributes into the live object of the same class."""

    type_name: str
    attrs: dict


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def save_state(stem: str, state) -> None:
    """Write nested state as `<stem>.safetensors` (its tensors) + `<stem>.json` (the rest):
    dicts, lists, tuples (namedtuples and torch.Size become tuples), str, int, float, bool,
    None, enums (as their value), torch dtypes, and objects whose attributes are such values.
    Anything else raises TypeError: the save fails rather than losing state."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x, where: str):
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().to("cpu", copy=True).contiguous()  # copies: views share storage
            return {"__tensor__": key}
        if isinstance(x, enum.Enum):
            return encode(x.value, where)
        if x is None or isinstance(x, (bool, str, float)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, np.generic):
            return encode(x.item(), where)
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: encode(v, f"{where}.{k}") for k, v in x.items()}
            return {"__dict__": [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        if hasattr(x, "__dict__") and not callable(x):
            return {"__object__": _type_name(x),
                    "attrs": {k: encode(v, f"{where}.{k}") for k, v in vars(x).items()}}
        raise TypeError(f"save_state: {where} is a {_type_name(x)}, which has no pickle-free form")

    doc = {"format": STATE_FORMAT, "state": encode(state, "state")}
    save_file(tensors, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(doc))


def load_state(stem: str):
    """The state `save_state` wrote at `stem`, objects as SavedObject. Only JSON and
    safetensors are parsed; anything that does not fit that format raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read(name: str, parse):
        try:
            return parse(name)
        except FileNotFoundError:
            raise CheckpointError(f"{name}: learner state file missing") from None
        except (OSError, ValueError, RecursionError, SafetensorError) as exc:
            raise CheckpointError(f"{name}: unreadable learner state ({type(exc).__name__}: {exc})") from None

    doc = read(f"{stem}.json", lambda name: json.loads(Path(name).read_text()))
    tensors = read(f"{stem}.safetensors", load_file)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{stem}.json: not a {STATE_FORMAT} file")

    def bad(why: str):
        return CheckpointError(f"{stem}.json: {why} (damaged or not written by rayalign)")

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        tags = [k for k in x if k.startswith("__")]
        if not tags:
            return {k: decode(v) for k, v in x.items()}
        tag = tags[0]
        if tag == "__tensor__" and len(x) == 1:
            if x[tag] not in tensors:
                raise bad(f"tensor {x[tag]!r} is not in {stem}.safetensors")
            return tensors[x[tag]]
        if tag == "__tuple__" and len(x) == 1 and isinstance(x[tag], list):
            return tuple(decode(v) for v in x[tag])
        if tag == "__dict__" and len(x) == 1 and isinstance(x[tag], list):
            out = {}
            for pair in x[tag]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise bad("a __dict__ entry is not a [key, value] pair")
                key = decode(pair[0])
                try:
                    out[key] = decode(pair[1])
                except TypeError:
                    raise bad(f"unhashable key {key!r}") from None
            return out
        if tag == "__dtype__" and len(x) == 1:
            dtype = getattr(torch, str(x[tag]), None)
            if not isinstance(dtype, torch.dtype):
                raise bad(f"unknown dtype {x[tag]!r}")
            return dtype
        if tag == "__object__" and set(x) == {"__object__", "attrs"} and isinstance(x["attrs"], dict):
            return SavedObject(str(x[tag]), {str(k): decode(v) for k, v in x["attrs"].items()})
        raise bad(f"unknown entry {sorted(x)}")

    try:
        return decode(doc.get("state"))
    except RecursionError:
        raise bad("nested too deeply") from None


def restore_objects(saved, live):
    """`saved` (from load_state) with every SavedObject replaced by the object at the same
    place in `live` (the current state, e.g. `optimizer.state_dict()`), after writing the
    saved attributes into it. The class must match and the attributes must exist on the
    live object; otherwise CheckpointError."""
    if isinstance(saved, SavedObject):
        if live is None or _type_name(live) != saved.type_name:
            raise CheckpointError(f"saved state holds a {saved.type_name} where this run has "
                                  f"{'nothing' if live is None else _type_name(live)}")
        current = vars(live)
        for key, value in saved.attrs.items():
            if key not in current:
                raise CheckpointError(f"saved {saved.type_name} has an attribute {key!r} this version lacks")
            setattr(live, key, restore_objects(value, current[key]))
        return live
    if isinstance(saved, dict):
        return {k: restore_objects(v, live.get(k) if isinstance(live, dict) else None) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        same = isinstance(live, (list, tuple)) and len(live) == len(saved)
        items = [restore_objects(v, live[i] if same else None) for i, v in enumerate(saved)]
        return tuple(items) if isinstance(saved, tuple) else items
    return saved
