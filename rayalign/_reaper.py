"""Reaper of a local Ray a driver started: once the driver is gone, SIGKILL what is left of it.

    python rayalign/_reaper.py <driver_pid> <session_dir> <token>   # (started by ensure_ray)

`ensure_ray` starts it in its own session right after `ray.init` started a local Ray, with a
pipe as stdin. Ray's kernel fate-sharing takes gcs_server and raylet down with a SIGKILLed
driver, but its agents and workers can linger for tens of seconds (`ray::DashboardAgent`,
`ray::RuntimeEnvAgent`, idle workers). The reaper waits until its stdin reaches end of file
(the driver closed it after `ray.shutdown()`, or died) or the driver's pid is gone (a forked
child may still hold the pipe), then kills every process of that Ray: those whose command
line names the session dir (gcs_server, raylet, monitors, agents) or whose environment holds
the token the driver set around `ray.init` (workers, which retitle themselves `ray::...`).
After a normal shutdown it finds nothing, or a straggler, and exits.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import psutil

TOKEN_ENV = "RAYALIGN_RAY_OWNER"  # set by ensure_ray around ray.init


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_driver(driver_pid: int, poll_s: float = 0.5) -> None:
    """Return once the driver closed our stdin or is no longer running."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    stdin = sys.stdin.fileno()
    while _alive(driver):
        readable, _, _ = select.select([stdin], [], [], poll_s)
        if readable and not os.read(stdin, 4096):
            return  # end of file


def _names(arg: str, session_dir: str) -> bool:
    """`arg` names session_dir itself or a path under it, not a longer sibling name."""
    at = arg.find(session_dir)
    while at >= 0:
        end = at + len(session_dir)
        if end == len(arg) or not (arg[end].isalnum() or arg[end] in "_-."):
            return True
        at = arg.find(session_dir, end)
    return False


def members(session_dir: str, token: str) -> list[psutil.Process]:
    """Running processes of the Ray session (this reaper excluded)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if any(_names(arg, session_dir) for arg in proc.cmdline()) or \
                    proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def sweep(session_dir: str, token: str, timeout_s: float = 10.0) -> int:
    """SIGKILL the session's processes until two scans in a row find none (a dying raylet may
    still start a worker); returns how many were killed."""
    killed, empty_scans, deadline = set(), 0, time.monotonic() + timeout_s
    while empty_scans < 2 and time.monotonic() < deadline:
        procs = [p for p in members(session_dir, token) if _alive(p)]
        empty_scans = 0 if procs else empty_scans + 1
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)  # psutil checks the pid was not reused
                killed.add(proc.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    return len(killed)


def main(argv: list[str]) -> int:
    driver_pid, session_dir, token = int(argv[0]), argv[1], argv[2]
    wait_for_driver(driver_pid)
    n = sweep(session_dir, token)
    if n:
        print(f"rayalign reaper: killed {n} leftover process(es) of {session_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
