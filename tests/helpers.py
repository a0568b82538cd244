"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def write_head(src: str | Path, dst: str | Path, n: int) -> Path:
    """Write the first `n` lines (rows) of JSONL file `src` to `dst`; returns `dst`."""
    dst = Path(dst)
    dst.write_text("\n".join(Path(src).read_text().splitlines()[:n]) + "\n")
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its sha256: equal snapshots mean byte-for-byte unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def merged(cfg: dict, over: dict) -> dict:
    """`cfg` with `over` applied; a dict value updates that section instead of replacing it."""
    out = dict(cfg)
    for key, value in over.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def forbid_driver_tokenizing(monkeypatch) -> None:
    """Make `stream.tokenize`'s in-process path fail, so whatever gets tokenized went through
    Ray tasks (Ray's state API, which lists tasks, needs the dashboard the tests' Ray lacks)."""
    from rayalign import stream

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized in the driver process, not by Ray tasks")

    monkeypatch.setattr(stream, "tokenize_local", refuse)
