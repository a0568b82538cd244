"""push_to_hub: a run's model on the Hugging Face Hub, with transformers' meaning.

`HubPusher(cfg)` creates the repo when the run starts (`HfApi().create_repo(hub_model_id or
output_dir's basename, private=hub_private_repo, exist_ok=True)`, as `Trainer.init_hf_repo`), so
a bad token fails before any training. `push` uploads what output_dir holds for the model: its
published model files (every shard of a sharded save, PEFT adapter, tokenizer, generation
config, chat template), the README.md model card, trainer_state.json and the *_results.json
files. Each push uploads a snapshot of those files taken when it was asked for (hard links on a
local output_dir), so a background push (hub_strategy "every_save") never mixes files of two
saves. `push_output_dir` does the same for any finished output_dir or model dir (no training).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow.fs as pafs

from rayalign import checkpoint as ckpt
from rayalign import storage

logger = logging.getLogger("rayalign")

RUN_RESULTS = ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json")


def hub_files(directory: str) -> list[str]:
    """The files of `directory` a push uploads (a local path or a URI)."""
    fs, p = storage.resolve(directory)
    infos = fs.get_file_info([f"{p.rstrip('/')}/{name}" for name in RUN_RESULTS])
    return ckpt.model_files(directory) + [n for n, i in zip(RUN_RESULTS, infos) if i.type == pafs.FileType.File]


def snapshot(directory: str) -> str:
    """A local folder holding `hub_files(directory)` as they are now: hard links next to a
    local directory (copies where links fail), downloads from a URI."""
    fs, p = storage.resolve(directory)
    local = storage.local_path(directory)
    folder = os.path.join(local, f".staging-hub-{uuid.uuid4().hex[:8]}") if local else None
    if folder is not None:
        try:
            os.makedirs(folder)
        except OSError:  # a dir this job may not write to (a model dir): copies in a temp dir
            folder = None
    folder = folder or tempfile.mkdtemp(prefix="rayalign-hub-")
    for name in hub_files(directory):
        src, dst = f"{p.rstrip('/')}/{name}", os.path.join(folder, name)
        if local:
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return folder


def create_repo(repo_name: str, *, private: bool | None = None, token: str | None = None) -> str:
    """The repo's id (namespace/name), created if missing."""
    import huggingface_hub

    return huggingface_hub.HfApi().create_repo(repo_name, token=token, private=private, exist_ok=True).repo_id


def upload(folder: str, repo_id: str, *, commit_message: str, token: str | None = None,
           revision: str | None = None):
    """One commit of `folder`'s files to `repo_id` (transformers' `upload_folder` call)."""
    import huggingface_hub

    return huggingface_hub.HfApi().upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                                 token=token, revision=revision)


def push_output_dir(directory: str, repo_name: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = "End of training") -> str:
    """Upload a finished output_dir (or any model dir) as `push_to_hub` does at the end of a
    run, without training; returns the repo id."""
    repo_id = create_repo(repo_name, private=private, token=token)
    folder = snapshot(directory)
    try:
        upload(folder, repo_id, commit_message=commit_message, token=token, revision=revision)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return repo_id


class HubPusher:
    """One run's pushes of `cfg.output_dir` to its hub repo: `push(message)` in the background
    (skipped while the previous one runs, unless hub_always_push), `push(message, blocking=True)`
    waits for earlier pushes first and raises if the upload fails."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.repo_id = create_repo(cfg.hub_repo_name, private=cfg.hub_private_repo, token=cfg.hub_token)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayalign-hub")
        self._pending: list[Future] = []
        logger.info("push_to_hub: pushing %s to %s", cfg.output_dir, self.repo_id)

    def push(self, commit_message: str, *, blocking: bool = False) -> None:
        self._reap()
        if not blocking and self._pending and not self.cfg.hub_always_push:
            logger.info("push_to_hub: previous push still running, skipping %r (hub_always_push=false)",
                        commit_message)
            return
        folder = snapshot(self.cfg.output_dir)
        if blocking:
            self.wait()
            self._upload(folder, commit_message)
            return
        self._pending.append(self._executor.submit(self._upload, folder, commit_message))

    def _upload(self, folder: str, commit_message: str) -> None:
        try:
            upload(folder, self.repo_id, commit_message=commit_message, token=self.cfg.hub_token,
                   revision=self.cfg.hub_revision)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def wait(self) -> None:
        """Wait for the background pushes; a failed one is logged (the final push follows it)."""
        self._reap(wait=True)

    def _reap(self, wait: bool = False) -> None:
        running = []
        for future in self._pending:
            if not wait and not future.done():
                running.append(future)
            elif future.exception() is not None:
                logger.warning("push_to_hub: a background push to %s failed: %s", self.repo_id, future.exception())
        self._pending = running

    def close(self) -> None:
        self._executor.shutdown(wait=True)
