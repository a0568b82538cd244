"""Remote storage paths (checkpoints, the reference cache, log mirroring) on a filesystem that
is not the local one: an in-memory fsspec store served through pyarrow as `mem://` URIs (an
object store cannot exist on this machine; everything else is real). `file://` URIs run end
to end in tests/drivers/test_offline.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest

from rayalign import checkpoint as ckpt
from rayalign import refcache, storage
from rayalign.actors.reference import write_cache_part


@pytest.fixture
def mem_store(monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs.clear()
    mem = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    real = storage.resolve

    def resolve(path):
        if str(path).startswith("mem://"):
            return mem, "/" + str(path)[len("mem://"):].strip("/")
        return real(path)

    monkeypatch.setattr(storage, "resolve", resolve)
    monkeypatch.setattr(ckpt, "_fs", resolve)
    return mem


def test_paths_and_uris():
    assert storage.join("s3://b/runs", "x", "checkpoint-5") == "s3://b/runs/x/checkpoint-5"
    assert storage.parent("s3://b/runs/dpo") == "s3://b/runs"
    assert storage.local_path("file:///tmp/a/b") == "/tmp/a/b"
    assert storage.local_path("relative/dir") == os.path.abspath("relative/dir")
    with pytest.raises(ValueError, match="nosuch://x"):
        storage.resolve("nosuch://x")


def test_checkpoint_commit_list_and_download_on_remote_store(mem_store, tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"w" * 100)
    (staged / "config.json").write_text("{}")
    uri = ckpt.commit_checkpoint(str(staged), "mem://bucket/run", "checkpoint-5", step=5)
    assert uri == "mem://bucket/run/checkpoint-5"
    assert ckpt.verify_checkpoint(uri)["step"] == 5
    # A checkpoint without its marker (a crash mid-upload) is never "latest".
    with mem_store.open_output_stream("/bucket/run/checkpoint-9/model.safetensors") as f:
        f.write(b"partial")
    assert ckpt.resolve_checkpoint("mem://bucket/run", "latest") == uri
    local = ckpt.download_checkpoint(uri, str(tmp_path / "dl"))
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"w" * 100


def test_reference_cache_parts_finalize_and_load_on_remote_store(mem_store):
    cache = "mem://bucket/.rayalign_ref_cache/abc"
    storage.makedirs(storage.join(cache, "parts"))
    write_cache_part(cache, [2, 0], [-2.0, -0.5], [-3.0, -1.5])
    assert refcache.load_cached(cache, 3) is None  # no marker yet
    write_cache_part(cache, [1], [-1.0], [-2.0])
    assert refcache.scored_rows(cache) == {0, 1, 2}
    assert refcache.finalize(cache, 3)
    chosen, rejected = refcache.load_cached(cache, 3)
    np.testing.assert_allclose(chosen[:3], [-0.5, -1.0, -2.0])
    np.testing.assert_allclose(rejected[:3], [-1.5, -2.0, -3.0])
    assert json.loads(storage.read_text(storage.join(cache, "complete.json")))["num_rows"] == 3
    assert storage.listdir(storage.join(cache, "parts")) == []


def test_run_files_mirror_and_sync(mem_store, tmp_path):
    files = storage.RunFiles("mem://bucket/run", mirror_root=str(tmp_path / "mirror"))
    assert files.remote and files.local_dir.startswith(str(tmp_path / "mirror"))
    with open(os.path.join(files.local_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 0.7}\n')
    os.makedirs(os.path.join(files.local_dir, "runs"))
    with open(os.path.join(files.local_dir, "runs", "events.out"), "w") as f:
        f.write("tb")
    files.sync()
    assert storage.read_text("mem://bucket/run/metrics.jsonl") == '{"step": 1, "loss": 0.7}\n'
    assert storage.read_text("mem://bucket/run/runs/events.out") == "tb"
    # A resumed run on a fresh node pulls the metrics down before appending.
    again = storage.RunFiles("mem://bucket/run", mirror_root=str(tmp_path / "mirror2"))
    again.pull()
    assert open(os.path.join(again.local_dir, "metrics.jsonl")).read().startswith('{"step": 1')
    local = storage.RunFiles(str(tmp_path / "plain"))
    assert not local.remote and local.local_dir == str(tmp_path / "plain")
