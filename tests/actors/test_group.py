"""ActorGroup on a real local Ray: placement, gloo rendezvous, call/scatter, clear failures."""

import pytest
import ray
import torch

from rayalign.actors.group import ActorFailure, ActorGroup, ClusterError, DistributedWorker, GroupSpec


class Summer(DistributedWorker):
    def __init__(self, offset: int, *, rank: int, world_size: int):
        self.value = offset + rank
        self.rank = rank

    def all_reduce(self) -> float:
        t = torch.tensor([float(self.value)])
        torch.distributed.all_reduce(t)
        return float(t.item())

    def add(self, x: int) -> int:
        return self.value + x

    def whoami(self) -> tuple[int, int]:
        return self.rank, self.value


def test_group_rendezvous_and_calls(ray_local):
    group = ActorGroup(Summer, GroupSpec("summer", 2, num_cpus_per_actor=0.5), args=(10,))
    try:
        group.init_distributed("gloo", timeout_s=60)
        assert group.call("all_reduce", timeout=60) == [21.0, 21.0]  # 10 + 11
        assert group.scatter("add", [(1,), (2,)]) == [11, 13]
        assert group.call("whoami") == [(0, 10), (1, 11)]
    finally:
        group.shutdown()


def test_impossible_placement_fails_clearly(ray_local):
    with pytest.raises(ClusterError, match="learner") as err:
        ActorGroup(Summer, GroupSpec("learner", 1, num_cpus_per_actor=1, num_gpus_per_actor=1),
                   args=(0,), placement_timeout_s=3)
    assert "GPU" in str(err.value)


def test_dead_actor_raises_instead_of_hanging(ray_local):
    group = ActorGroup(Summer, GroupSpec("summer", 2, num_cpus_per_actor=0.5), args=(0,))
    try:
        ray.kill(group.actors[1])
        with pytest.raises(ActorFailure, match="summer actor 1 died"):
            group.call("add", 1, timeout=60)
    finally:
        group.shutdown()


def test_custom_resource_no_node_has_fails_at_once_naming_the_field(ray_local):
    import time

    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"rollout\.resources: no node of this Ray cluster has \['rollout_node'\]"):
        ActorGroup(Summer, GroupSpec("rollout", 1, num_cpus_per_actor=0.5, resources={"rollout_node": 1}),
                   args=(0,), placement_timeout_s=60)
    assert time.monotonic() - started < 30  # not after the placement timeout


def test_spec_of_a_config_section_carries_its_resources():
    from rayalign.config import RolloutConfig

    spec = GroupSpec.of("rollout", RolloutConfig(backend="hf", num_actors=2, num_cpus_per_actor=2,
                                                 resources={"rollout_node": 0.5}))
    assert (spec.num_actors, spec.bundle()) == (2, {"CPU": 2, "rollout_node": 0.5})
