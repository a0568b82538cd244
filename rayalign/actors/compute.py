"""One OS thread for an actor's torch work.

Ray runs a synchronous actor's method calls on more than one thread of its own (a learner's
train_step calls were seen alternating between two). torch's CPU kernels parallelise with
OpenMP, whose thread team and thread count belong to the thread that starts a parallel
region: every switch of calling thread moves the work to another team whose workers have to
be woken, and a thread that never called `torch.set_num_threads` runs with the process
default. Measured on a 17M-parameter DPO learner with 2 threads: the learner used 168% of
the 2 cores and stepped in 0.84 s, against 199% and 0.68 s for the same step run in one
thread of a plain process.

A second thread that ever runs a parallel torch op costs more than its own call. GNU OpenMP
(torch's CPU wheels) keeps a thread team per calling thread, and once the process holds more
OpenMP threads than it has CPUs it switches every team to "throttled" waiting: a worker sleeps
in the kernel after ~100 spins instead of ~300k, so every small parallel region (a decode
step's matmuls) pays a wake-up. Measured on the 17M-parameter HF rollout engine with 2 threads
on 2 CPUs: 1.38 s per generate call, 1.65 s after one weight load or fingerprint had run on
Ray's thread, for the rest of the process's life.

`on_compute_thread` runs the decorated actor methods on a single thread per process, with
the thread count the actor chose (`use_threads`, in its constructor) applied there. Every
method that runs torch ops goes there, constructors (model loading) included, so a process
has one OpenMP team.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayalign-compute")
        return _pool


def use_threads(owner, threads: int) -> None:
    """Set torch's thread count for `owner` (an actor or engine): now, on the calling thread,
    and on the compute thread before each of `owner`'s `on_compute_thread` methods."""
    import torch

    owner.torch_threads = threads
    torch.set_num_threads(threads)


def _run(self, fn, args, kwargs):
    import torch

    threads = getattr(self, "torch_threads", None)
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread
    return fn(self, *args, **kwargs)


def on_compute_thread(fn: F) -> F:
    """Run the actor method `fn` on this process's compute thread (and wait for it)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if threading.current_thread().name.startswith("rayalign-compute"):
            return fn(self, *args, **kwargs)  # called from another compute-thread method
        return _executor().submit(_run, self, fn, args, kwargs).result()

    return wrapper  # type: ignore[return-value]
