"""Where a run's files live: a local path, a `file://` URI, or any URI pyarrow's filesystems
understand (`s3://`, `gs://`, `hdfs://`, ...), so multi-node runs never depend on one node's disk.

Checkpoints are committed to the URI directly (`rayalign.checkpoint`) and the reference-log-prob
cache is read and written there (`rayalign.refcache`). Files written by a library that only
knows local paths (metrics JSONL, TensorBoard events, tables, plots) go to a local mirror of the
output dir and are copied up with `RunFiles.sync`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Plain paths are made absolute on the local filesystem."""
    path = os.fspath(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path!r}: not a path or a storage URI pyarrow can open ({exc})") from None


def is_local(path: str) -> bool:
    return isinstance(resolve(path)[0], pafs.LocalFileSystem)


def local_path(path: str) -> str | None:
    """The local path behind `path` (plain or file://), or None for remote storage."""
    fs, p = resolve(path)
    return p if isinstance(fs, pafs.LocalFileSystem) else None


def join(base: str, *names: str) -> str:
    """Join path parts onto a path or URI, keeping the scheme."""
    out = str(base).rstrip("/")
    for name in names:
        out = f"{out}/{name.strip('/')}"
    return out if is_uri(base) else os.path.normpath(out)


def parent(path: str) -> str:
    """The directory containing `path` (for URIs: the prefix before the last segment)."""
    if is_uri(path):
        scheme, rest = str(path).split("://", 1)
        head = rest.rstrip("/").rsplit("/", 1)[0] if "/" in rest.rstrip("/") else rest
        return f"{scheme}://{head}"
    return os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text_atomic(path: str, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a torn one
    (tmp + rename on local disks; object stores publish whole objects on close)."""
    fs, p = resolve(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    else:
        with fs.open_output_stream(p) as f:
            f.write(text.encode())


def listdir(path: str) -> list[str]:
    """Base names of the entries directly under `path` ([] when it does not exist)."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two paths/URIs."""
    src_fs, s = resolve(src)
    dst_fs, d = resolve(dst)
    dst_fs.create_dir(d, recursive=True)
    pafs.copy_files(s, d, source_filesystem=src_fs, destination_filesystem=dst_fs)


def copy_file(src: str, dst: str) -> None:
    src_fs, s = resolve(src)
    dst_fs, d = resolve(dst)
    dst_fs.create_dir(os.path.dirname(d), recursive=True)
    pafs.copy_files(s, d, source_filesystem=src_fs, destination_filesystem=dst_fs)


class RunFiles:
    """A run's log files: written to `local_dir` (the output dir itself when it is local, a
    per-URI mirror under the temp dir otherwise) and copied up to `output_dir` by `sync`."""

    SYNCED = ("metrics.jsonl", "runs", "tables")

    def __init__(self, output_dir: str, mirror_root: str | None = None):
        self.output_dir = output_dir
        local = local_path(output_dir)
        self.remote = local is None
        if self.remote:
            key = hashlib.sha256(output_dir.encode()).hexdigest()[:16]
            root = mirror_root or os.path.join(tempfile.gettempdir(), "rayalign-mirror")
            local = os.path.join(root, key)
        self.local_dir = local
        os.makedirs(self.local_dir, exist_ok=True)

    def pull(self) -> None:
        """Bring the remote log files down (a resumed run appends to them)."""
        if not self.remote:
            return
        remote_metrics = join(self.output_dir, "metrics.jsonl")
        if exists(remote_metrics):
            copy_file(remote_metrics, os.path.join(self.local_dir, "metrics.jsonl"))

    def sync(self, names: tuple[str, ...] | None = None, extra: tuple[str, ...] = ()) -> None:
        """Copy `names` (default: metrics, TensorBoard events, tables) plus `extra` files up."""
        if not self.remote:
            return
        for name in (names or self.SYNCED) + tuple(extra):
            src = os.path.join(self.local_dir, name)
            if os.path.isdir(src):
                copy_dir(src, join(self.output_dir, name))
            elif os.path.isfile(src):
                copy_file(src, join(self.output_dir, name))


class StorageError(ValueError):
    """A run directory the cluster's nodes cannot all reach."""


def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared(path: str, field: str = "output_dir", nodes=None, sees=None) -> None:
    """On a multi-node Ray cluster a local `path` (not a URI) must be on storage every node
    mounts: learners on other nodes write checkpoints there and a recovered run reads them back.
    A probe file is written next to `path` by the driver and looked for from every alive node
    (a zero-CPU task pinned to it); a node that cannot see it fails the run before any actor
    starts. `nodes` / `sees` replace Ray's node list and the per-node look-up in tests of the
    decision (a node-local disk cannot exist on one machine)."""
    import uuid

    import ray

    if is_uri(path):
        return
    if nodes is None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    base = os.path.abspath(path)
    while not os.path.isdir(base):
        base = os.path.dirname(base)
    probe = os.path.join(base, f".rayalign-probe-{uuid.uuid4().hex}")
    with open(probe, "w") as f:
        f.write("probe")
    try:
        if sees is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            look = ray.remote(num_cpus=0)(_sees)
            refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                 ).remote(probe) for n in nodes]
            seen = ray.get(refs, timeout=120)
        else:
            seen = [sees(n, probe) for n in nodes]
    finally:
        os.remove(probe)
    blind = [n.get("NodeManagerAddress", n.get("NodeID")) for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise StorageError(
            f"{field}: {path} is not visible from Ray node(s) {', '.join(map(str, blind))}: on a multi-node "
            f"cluster checkpoints, metrics and the reference cache must be on storage every node mounts; give a "
            f"path on a shared mount or a URI (s3://, gs://, file:// on a shared filesystem)")
