"""One generic helper that runs N actors of one role: placement group, rendezvous, calls.

Every role (policy learner, reference, reward, rollout) is started through `ActorGroup`:
it reserves one bundle per actor in a placement group (failing with a clear message
instead of pending forever when the cluster cannot hold it), starts the actors, lets rank 0
publish a `tcp://ip:port` address for torch.distributed, and calls methods on all actors
with a timeout so a dead peer surfaces as an error rather than a hang.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayalign import _reaper, faults, logs

logger = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster cannot provide what the config asks for (resources, address)."""


class ActorFailure(RuntimeError):
    """An actor of a group died (killed, OOM, node lost); the driver may recover from it."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM reached the driver (the CLI raises it from its signal handler). A
    BaseException, as KeyboardInterrupt is, so `except Exception` does not swallow it while the
    drivers' `finally:` blocks still shut their actor groups down."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Deferred:
    """save_on_interrupt: while a driver's step loop runs, the CLI's first SIGINT/SIGTERM only
    records its signal here; the loop finishes the step, saves a checkpoint and raises
    `Interrupted` itself. Outside the loop (or with save_on_interrupt off) it raises at once."""

    on = False
    signum: int | None = None


def defer_interrupts(on: bool) -> None:
    """Start (True) or stop (False) deferring the first signal to the end of the current step."""
    _Deferred.on = on
    if not on:
        _Deferred.signum = None


def deferring_interrupts() -> bool:
    return _Deferred.on and _Deferred.signum is None


def record_interrupt(signum: int) -> None:
    _Deferred.signum = signum


def pending_interrupt() -> int | None:
    """The signal that asked the running step loop to save and stop, if one came."""
    return _Deferred.signum if _Deferred.on else None


@dataclass(frozen=True)
class GroupSpec:
    """Resources of one actor group: N actors with the same per-actor CPUs/GPUs and custom
    resources (`resources`: names nodes were started with, which pins the group to them)."""

    name: str
    num_actors: int
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    strategy: str = "PACK"  # placement-group strategy: PACK, SPREAD, STRICT_PACK ...
    resources: dict | None = None
    field: str | None = None  # the config section it comes from, for errors (default: name)

    @classmethod
    def of(cls, name: str, section, num_actors: int | None = None, field: str | None = None) -> "GroupSpec":
        """The spec a config section (learner, reference, rollout, scoring: num_actors,
        num_cpus_per_actor, num_gpus_per_actor, resources) asks for."""
        return cls(name, section.num_actors if num_actors is None else num_actors, section.num_cpus_per_actor,
                   section.num_gpus_per_actor, resources=section.resources, field=field or name)

    def bundle(self) -> dict:
        """One actor's placement-group bundle."""
        out = {"CPU": self.num_cpus_per_actor, **(self.resources or {})}
        if self.num_gpus_per_actor:
            out["GPU"] = self.num_gpus_per_actor
        return out


class DistributedWorker:
    """Base class for actors that join a torch.distributed group (learners, references)."""

    def node_address(self) -> tuple[str, int]:
        """This actor's node IP and a free TCP port (rank 0's answer is the rendezvous)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ip, port

    def pid(self) -> int:
        return os.getpid()

    def init_distributed(self, master_addr: str, master_port: int, rank: int, world_size: int,
                         backend: str, timeout_s: float) -> None:
        """Join the process group. DeepSpeed reads the same env variables."""
        import torch.distributed as dist

        os.environ.update({
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": "0",  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
            "LOCAL_WORLD_SIZE": "1",
        })
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
            )


_reaper_proc: subprocess.Popen | None = None  # of the local Ray ensure_ray started, if any


def ensure_ray(address: str | None = None, num_cpus: int | None = None, namespace: str | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS if given, else start a local Ray (and its reaper,
    see `rayalign._reaper`, which kills what is left of it once this process is gone)."""
    if address and address not in ("auto", "local"):
        _check_reachable(address)  # also when this process already holds a Ray connection
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    # ray.init replaces the SIGTERM handler with one that kills Ray and exits 1 before the
    # drivers' `finally:` blocks run; a handler the caller installed (the CLI's) stays.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            # No runtime_env here: inside `ray job submit` the job's own runtime env applies,
            # and Ray refuses a driver env that repeats its keys.
            ray.init(address=address, namespace=namespace, configure_logging=False,
                     log_to_driver=not logs.quiet())
        else:
            _stop_reaper()  # of an earlier local Ray this process shut down itself
            # Every process of this Ray inherits the token (gcs and raylet from us, workers and
            # agents from raylet): the reaper finds them by it, whatever title they set.
            token = uuid.uuid4().hex
            os.environ[_reaper.TOKEN_ENV] = token
            try:
                ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=False,
                         runtime_env={"env_vars": env}, configure_logging=False, log_to_driver=not logs.quiet())
            finally:
                os.environ.pop(_reaper.TOKEN_ENV, None)  # not for processes we start later
            _start_reaper(token)
    except ConnectionError as exc:
        raise ClusterError(f"ray.address: cannot connect to Ray at {address!r}: {exc}") from exc
    except ray.exceptions.AuthenticationError as exc:
        raise ClusterError(
            f"ray.address: the Ray cluster at {address!r} uses token authentication: run with "
            "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN or "
            f"RAY_AUTH_TOKEN_PATH (see cluster/local/README.md): {exc}") from exc
    finally:
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    quiet_ray_data()
    node = ray._private.worker._global_node
    if logs.quiet() and node is not None:
        logger.info("Ray actors' output: %s/logs (--verbose prints it here)", node.get_session_dir_path())


def _start_reaper(token: str) -> None:
    """Start the reaper of the local Ray just started: in its own session, so that a SIGKILL
    of this process's group spares it; its stdin is a pipe whose end tells it we are gone."""
    global _reaper_proc
    node = ray._private.worker._global_node
    if node is None or not node.head:
        return  # ray.init found a `ray start` Ray on this machine and joined it: not ours
    _reaper_proc = subprocess.Popen(
        [sys.executable, _reaper.__file__, str(os.getpid()), node.get_session_dir_path(), token],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


def _stop_reaper(timeout_s: float = 10.0) -> None:
    """Tell the reaper to sweep now (close its pipe) and wait until it has."""
    global _reaper_proc
    if _reaper_proc is None:
        return
    reaper, _reaper_proc = _reaper_proc, None
    reaper.stdin.close()
    try:
        reaper.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("the Ray reaper (pid %d) is still sweeping after %.0fs", reaper.pid, timeout_s)


def shutdown_ray() -> None:
    """Stop the local Ray `ensure_ray` started and everything left of it; leaves a Ray this
    process only connected to alone (drop the connection with `ray.shutdown()`)."""
    if _reaper_proc is None:
        return
    ray.shutdown()
    _stop_reaper()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the field, when nothing listens at a host:port address (Ray's
    own connect retries for minutes)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port (e.g. a cluster name): let Ray resolve it
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"ray.address (or RAY_ADDRESS): nothing answers at {address!r} ({exc}); "
                           "start the head first (cluster/local/start-head.sh) or unset it to run "
                           "on a local Ray") from None


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress output drowns the step lines; keep warnings only."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_custom_resources(resources: dict | None, field: str) -> None:
    """A custom resource (`<field>.resources`) no node of the cluster has fails now, naming
    the field, instead of after a placement timeout (or never, for a Ray Data stage)."""
    missing = sorted(set(resources or {}) - set(ray.cluster_resources()))
    if missing:
        raise ClusterError(f"{field}.resources: no node of this Ray cluster has {missing} (start the nodes "
                           f"meant for it with e.g. ray start --resources='{{\"{missing[0]}\": 1}}', or KubeRay's "
                           "rayStartParams resources)")


class ActorGroup:
    """N actors of one class in one placement group, addressed together."""

    def __init__(self, actor_cls: type, spec: GroupSpec, *, args: Sequence[Any] = (),
                 placement_timeout_s: float = 120.0, env_vars: dict[str, str] | None = None,
                 max_restarts: int = 0, placement: tuple[Any, int] | None = None):
        """`placement=(pg, first_bundle)`: use bundles first_bundle.. of an existing placement
        group (a Ray Tune trial's, which reserved every actor's resources up front) instead
        of reserving a new one."""
        if spec.num_actors < 1:
            raise ValueError(f"{spec.name}.num_actors must be >= 1")
        self.spec = spec
        bundle = spec.bundle()
        check_custom_resources(spec.resources, spec.field or spec.name)
        self._owns_pg = placement is None
        if placement is not None:
            self._pg, first = placement
        else:
            self._pg, first = placement_group([dict(bundle) for _ in range(spec.num_actors)],
                                              strategy=spec.strategy), 0
        ready, _ = ray.wait([self._pg.ready()], timeout=placement_timeout_s)
        if not ready:
            available = ray.cluster_resources()
            if self._owns_pg:
                remove_placement_group(self._pg)
            raise ClusterError(
                f"{spec.name}: could not reserve {spec.num_actors} x {bundle} within "
                f"{placement_timeout_s:.0f}s; the cluster has {available}. Lower "
                f"{spec.name}.num_actors / num_cpus_per_actor / num_gpus_per_actor or add nodes.")
        remote_cls = ray.remote(actor_cls)
        env = {"OMP_NUM_THREADS": str(max(1, int(spec.num_cpus_per_actor) or 1)),
               "TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}
        if os.environ.get(faults.ENV):  # reliability tests: the injected fault reaches the actors
            env[faults.ENV] = os.environ[faults.ENV]
        self.actors = [
            remote_cls.options(
                name=f"{spec.name}-{i}-{uuid.uuid4().hex[:8]}",  # findable: ray.util.list_named_actors()
                num_cpus=spec.num_cpus_per_actor,
                num_gpus=spec.num_gpus_per_actor,
                resources=spec.resources or None,
                max_restarts=max_restarts,
                max_concurrency=2,  # several learners may query one reference actor at once
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=first + i),
                runtime_env={"env_vars": env},
            ).remote(*args, rank=i, world_size=spec.num_actors)
            for i in range(spec.num_actors)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def init_distributed(self, backend: str, timeout_s: float) -> None:
        """Rank 0 publishes its address; every rank joins the process group."""
        addr, port = ray.get(self.actors[0].node_address.remote(), timeout=timeout_s)
        self.call("init_distributed", addr, port, backend=backend, timeout_s=timeout_s,
                  rank_arg=True, timeout=timeout_s)

    def call_async(self, method: str, *args, rank_arg: bool = False, **kwargs) -> list[ray.ObjectRef]:
        refs = []
        for rank, actor in enumerate(self.actors):
            extra = {"rank": rank, "world_size": len(self.actors)} if rank_arg else {}
            refs.append(getattr(actor, method).remote(*args, **kwargs, **extra))
        return refs

    def call(self, method: str, *args, timeout: float | None = None, rank_arg: bool = False,
             **kwargs) -> list[Any]:
        """Call `method` on every actor with the same arguments and gather the results."""
        return self.get(self.call_async(method, *args, rank_arg=rank_arg, **kwargs), timeout)

    def scatter(self, method: str, per_actor_args: Sequence[Sequence[Any]], *,
                timeout: float | None = None, **kwargs) -> list[Any]:
        """Call `method` on actor i with `per_actor_args[i]` (e.g. one shard each)."""
        if len(per_actor_args) != len(self.actors):
            raise ValueError(f"{self.spec.name}: {len(per_actor_args)} argument sets for "
                             f"{len(self.actors)} actors")
        refs = [getattr(a, method).remote(*args, **kwargs) for a, args in zip(self.actors, per_actor_args)]
        return self.get(refs, timeout)

    def get(self, refs: list[ray.ObjectRef], timeout: float | None) -> list[Any]:
        """Results in order. An actor that died raises `ActorFailure` as soon as Ray reports
        it, even while its peers still wait in a collective; an error raised by a survivor
        because its peer vanished (gloo "connection closed") is reported as that death."""
        deadline = None if timeout is None else time.monotonic() + timeout
        index = {ref: i for i, ref in enumerate(refs)}
        pending, task_error = list(refs), None
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if task_error is not None:  # give a dead peer's own error a moment to arrive
                left = 10.0 if left is None else min(left, 10.0)
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                if task_error is not None:
                    raise task_error
                raise TimeoutError(f"{self.spec.name}: no answer within {timeout}s (a peer may be dead "
                                   "or stuck in a collective)")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                raise ActorFailure(f"{self.spec.name} actor {index[ready[0]]} died: "
                                   f"{str(exc).splitlines()[0]}") from exc
            except ray.exceptions.RayTaskError as exc:
                task_error = task_error or exc
        if task_error is not None:
            raise task_error
        return ray.get(refs)

    def shutdown(self) -> None:
        """Kill the actors and release the placement group."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        self.actors = []
        if not self._owns_pg:
            return
        try:
            remove_placement_group(self._pg)
        except Exception:
            pass
