"""Deterministic fault injection for the reliability tests (off unless the variable is set).

`RAYALIGN_INJECT_FAULT="<point>@<step>:<marker-file>"` makes the process that reaches `<point>`
(e.g. `save`, `train_step`) at step `<step>` die at once with SIGKILL, as a preempted node
would, but only once: the marker file is created first, so the restarted run passes by.
"""

from __future__ import annotations

import os
import signal

ENV = "RAYALIGN_INJECT_FAULT"


def maybe_crash(point: str, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, marker = spec.partition(":")
    name, _, at = where.partition("@")
    if name != point or int(at) != step or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process fires
    except FileExistsError:
        return
    os.write(fd, f"{point}@{step} pid {os.getpid()}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
