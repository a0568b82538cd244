"""Who owns an output dir, and what a resume may continue.

A training job takes `<output_dir>/.rayalign.lock` (host, pid, run id) before Ray starts and
holds it to the end; a second job on the same dir fails at once, and a lock whose process
is gone (same host) is taken over. A dir that holds another run's files is refused unless
the job resumes it (`resume_from_checkpoint`) or replaces it (`overwrite_output_dir`). The
old run's files are removed only when the new run *claims* the dir — after its first step
succeeded — so a run that fails while starting leaves the previous one as it was. Every
checkpoint's marker carries the run id; recovery after an actor failure restores only
checkpoints of this run (or the checkpoint it resumed from).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

import pyarrow.fs as pafs

from rayalign import checkpoint as ckpt
from rayalign import storage
from rayalign.config import DPOConfig, OnlineDPOConfig, RewardConfig, TrainConfig, to_dict

logger = logging.getLogger("rayalign")

LOCK = ".rayalign.lock"
# What a run writes at the top of its output dir (besides checkpoint-<n>/ and scratch dirs).
RUN_FILES = ("metrics.jsonl", "metrics.png", "runs", "tables", "weight_sync.jsonl", "trainer_state.json",
             "train_results.json", "eval_results.json", "all_results.json", *ckpt.MODEL_FILES)
SCRATCH_PREFIXES = (".tmp-", ".staging-")


def is_run_file(name: str) -> bool:
    """A top-level entry a run writes: RUN_FILES, or a shard of a sharded published model."""
    return name in RUN_FILES or bool(ckpt.SHARD.fullmatch(name))

# Fields a resumed run must share with the checkpoint's run: they fix the model, the data
# order and position, the per-rank optimizer state layout, or the objective.
RESUME_MUST_MATCH = ("model_name_or_path", "tokenizer_path", "train_dataset", "dataset_name", "dataset_config",
                     "dataset_train_split", "column_mapping", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "learner.num_actors", "learner.zero_stage", "seed",
                     "max_length", "truncation_mode", "lora.enabled", "lora.r", "lora.target_modules")
RESUME_MUST_MATCH_BY_KIND = {
    DPOConfig: ("loss_type",),
    OnlineDPOConfig: ("loss_type",),
    RewardConfig: (),
}


class OutputDirError(ValueError):
    """An output_dir this job may not write to; the message says why and what to do."""


def _realpath(path: str | None) -> str | None:
    if not path or storage.is_uri(path) and not storage.is_local(path):
        return None
    local = storage.local_path(path)
    return os.path.realpath(local) if local and os.path.exists(local) else None


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def run_entries(output_dir: str) -> list[str]:
    """The entries of `output_dir` that belong to a training run (empty: a fresh dir)."""
    names = storage.listdir(output_dir)
    return [n for n in names if is_run_file(n) or (n.startswith("checkpoint-") and n[11:].isdigit())]


def check_output_dir(cfg: TrainConfig) -> None:
    """Before Ray starts: refuse an output_dir that is a file, is (inside) the model dir,
    holds another run without resume/overwrite, or is locked by a live job."""
    out = cfg.output_dir
    fs, p = storage.resolve(out)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        raise OutputDirError(f"output_dir={out}: is an existing file, not a directory")
    out_real = _realpath(out) or (os.path.realpath(p) if isinstance(fs, pafs.LocalFileSystem) else None)
    models = {"model_name_or_path": cfg.model_name_or_path, "tokenizer_name_or_path": cfg.tokenizer_name_or_path}
    ref = getattr(getattr(cfg, "reference", None), "model_name_or_path", None)
    if ref:
        models["reference.model_name_or_path"] = ref
    for name, path in models.items():
        model_real = _realpath(path)
        if out_real is None or model_real is None:
            continue
        if _inside(out_real, model_real):
            raise OutputDirError(f"output_dir={out}: is {'' if out_real == model_real else 'inside '}the model dir "
                                 f"{name}={path}; the run would overwrite the model it starts from. "
                                 "Choose another output_dir")
        if cfg.overwrite_output_dir and _inside(model_real, out_real):
            raise OutputDirError(f"output_dir={out}: overwrite_output_dir would delete {name}={path}, which lies "
                                 "inside it. Copy the model elsewhere or choose another output_dir")
    if info.type == pafs.FileType.NotFound:
        return
    held = _read_lock(out)
    if held is not None and _lock_is_live(held):
        raise OutputDirError(f"output_dir={out}: in use by another rayalign job (host {held.get('host')}, pid "
                             f"{held.get('pid')}, since {time.ctime(held.get('time', 0))}); wait for it to end or "
                             f"remove {storage.join(out, LOCK)} if that job is gone")
    entries = run_entries(out)
    if entries and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise OutputDirError(f"output_dir={out}: holds another run ({shown}); set resume_from_checkpoint: latest "
                             "to continue it, overwrite_output_dir: true to replace it, or choose another output_dir")


# ----------------------------------------------------------------------------- the lock


def _read_lock(out: str) -> dict | None:
    path = storage.join(out, LOCK)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (json.JSONDecodeError, OSError):
        return {}  # torn or unreadable: treated as held by an unknown owner on another host


def _lock_is_live(held: dict) -> bool:
    """A lock is stale when its process is gone; only checkable on the same host."""
    if held.get("host") != socket.gethostname():
        return True
    pid = int(held.get("pid", -1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """This run's hold on its output dir: `acquire` (the lock, before Ray starts), `claim`
    (after the first step: an overwrite removes the old run's files), `release` (the end)."""

    def __init__(self, cfg: TrainConfig, resume_step: int | None = None):
        self.cfg = cfg
        self.out = cfg.output_dir
        self.run_id = uuid.uuid4().hex[:12]
        self.resume_step = resume_step
        self.claimed = False
        self._created = False
        self._locked = False

    def acquire(self) -> "RunDir":
        fs, p = storage.resolve(self.out)
        self._created = fs.get_file_info(p).type == pafs.FileType.NotFound
        fs.create_dir(p, recursive=True)
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                           "time": time.time()})
        if isinstance(fs, pafs.LocalFileSystem):
            lock = os.path.join(p, LOCK)
            for _ in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    held = _read_lock(self.out)
                    if held is not None and _lock_is_live(held):
                        raise OutputDirError(f"output_dir={self.out}: in use by another rayalign job (host "
                                             f"{held.get('host')}, pid {held.get('pid')})") from None
                    logger.warning("output_dir %s: taking over the stale lock of pid %s", self.out,
                                   (held or {}).get("pid"))
                    os.unlink(lock)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(body)
                break
        else:  # object stores have no exclusive create: check, then write (best effort)
            storage.write_text_atomic(storage.join(self.out, LOCK), body)
        self._locked = True
        return self

    def claim(self) -> None:
        """The run owns the dir from here on. With overwrite_output_dir the previous run's
        files go (a resumed run: only checkpoints past the step it resumed from)."""
        if self.claimed:
            return
        self.claimed = True
        if not self.cfg.overwrite_output_dir:
            return
        fs, p = storage.resolve(self.out)
        removed = []
        for info in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)):
            name = info.base_name
            step = int(name[11:]) if name.startswith("checkpoint-") and name[11:].isdigit() else None
            if self.resume_step is not None:
                old = step is not None and step > self.resume_step
            else:
                old = is_run_file(name) or name.startswith(SCRATCH_PREFIXES) or step is not None
            if not old or (step is not None and self._is_ours(info.path)):
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
            removed.append(name)
        if removed:
            logger.info("overwrite_output_dir: removed the previous run's %s", ", ".join(sorted(removed)))

    def _is_ours(self, path: str) -> bool:
        try:
            return ckpt.verify_checkpoint(path).get("run_id") == self.run_id
        except ckpt.CheckpointError:
            return False

    def release(self) -> None:
        if not self._locked:
            return
        self._locked = False
        fs, p = storage.resolve(self.out)
        try:
            fs.delete_file(storage.join(p, LOCK) if not isinstance(fs, pafs.LocalFileSystem) else os.path.join(p, LOCK))
        except (FileNotFoundError, OSError):
            pass
        if self._created and isinstance(fs, pafs.LocalFileSystem):
            try:
                os.rmdir(p)  # only when the run left nothing behind
            except OSError:
                pass

    def __enter__(self) -> "RunDir":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint this run wrote (for recovery after actor failures);
        save_only_model checkpoints (no learner state) cannot be restored and are passed over."""
        for _, path in reversed(ckpt.list_checkpoints(self.out)):
            try:
                if ckpt.verify_checkpoint(path).get("run_id") == self.run_id and ckpt.is_resumable(path):
                    return path
            except ckpt.CheckpointError:
                continue
        return None


# ----------------------------------------------------------------------------- resume


def check_resume_end(path: str, step: int, total_steps: int) -> None:
    if step >= total_steps:
        raise ckpt.CheckpointError(
            f"resume_from_checkpoint={path}: the checkpoint is at step {step} and this run ends at step "
            f"{total_steps} (max_steps / num_train_epochs): nothing is left to train. Raise max_steps or "
            "num_train_epochs to continue it")


def check_resume(cfg: TrainConfig, total_steps: int | None) -> tuple[str, int]:
    """Before Ray starts: the checkpoint to resume (resolved, verified) and its step.
    Refuses one at or past the end of this run (total_steps None: checked later, once the
    data is counted, by `check_resume_end`), one whose run differs on a field that must
    match (named, with both values), and — without overwrite_output_dir — one with later
    checkpoints beside it (`latest` would then point at the other timeline)."""
    path = ckpt.resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    ckpt.verify_checkpoint(path)
    try:
        state = json.loads(storage.read_text(storage.join(path, "trainer_state.json")))
    except (FileNotFoundError, OSError, json.JSONDecodeError) as exc:
        raise ckpt.CheckpointError(f"resume_from_checkpoint={path}: no readable trainer_state.json ({exc})") from None
    step = ckpt.state_step(state)
    if total_steps is not None:
        check_resume_end(path, step, total_steps)
    mismatch = _mismatched_fields(cfg, path)
    if mismatch:
        raise ckpt.CheckpointError(
            f"resume_from_checkpoint={path}: this run differs from the checkpoint's on fields that must match: "
            + "; ".join(f"{name} (checkpoint: {old!r}, now: {new!r})" for name, old, new in mismatch)
            + ". Resume with the checkpoint's values, or start a new run from its weights "
            "(model_name_or_path: the checkpoint dir)")
    later = [f"checkpoint-{s}" for s, _ in ckpt._checkpoint_dirs(cfg.output_dir) if s > step]
    if later and not cfg.overwrite_output_dir:
        raise ckpt.CheckpointError(
            f"resume_from_checkpoint={path}: output_dir={cfg.output_dir} also holds later checkpoints "
            f"({', '.join(later)}) that this run would not replace; set overwrite_output_dir: true to remove "
            "them once the resumed run's first step succeeded, or resume from the latest")
    try:
        ckpt.check_resumable(path)  # learner state in rayalign's pickle-free format, never an old pickle
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"resume_from_checkpoint={cfg.resume_from_checkpoint}: {exc}") from None
    return path, step


def _mismatched_fields(cfg: TrainConfig, path: str) -> list[tuple[str, object, object]]:
    import yaml

    config_path = storage.join(path, "rayalign_config.yaml")
    if not storage.exists(config_path):
        return []  # a checkpoint without its run config (older rayalign): nothing to compare
    old = yaml.safe_load(storage.read_text(config_path)) or {}
    new = to_dict(cfg)
    for d in (old, new):
        d["tokenizer_path"] = d.get("tokenizer_name_or_path") or d.get("model_name_or_path")
    out = []
    for name in RESUME_MUST_MATCH + RESUME_MUST_MATCH_BY_KIND.get(type(cfg), ()):
        a, b = (_lookup(d, name) for d in (old, new))
        if name in PATH_FIELDS:
            a, b = (os.path.realpath(x) if isinstance(x, str) and not storage.is_uri(x) else x for x in (a, b))
        if a != b:
            out.append((name, a, b))
    return out


PATH_FIELDS = ("model_name_or_path", "tokenizer_path", "train_dataset")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
