"""A DPO run on a real multi-node Ray started on this machine (`ray.cluster_utils.Cluster`),
run by tests/multinode/test_multinode.py in a process of its own (its Ray is not the suite's).

    python tests/multinode/job.py MODEL_DIR DATA_URI OUT_DIR [--remove-node] [--bad-data URI]
    python tests/multinode/job.py MODEL_DIR DATA_URI OUT_URI --roles PROMPTS_FILE

The head node, where the driver runs, has no CPU, so nothing fits there. Four 1-CPU worker
nodes carry the custom resource `learner_node` and take the two learners (gloo rendezvous
across nodes, `learner.resources`) and Ray Data's tasks; a fifth node with 2 CPUs carries
`aux_node` and takes the reference actor (`reference.resources`). The training data (DATA_URI: a
directory of Parquet shards, as a file:// URI) is tokenized by Ray tasks on the worker nodes,
never on the driver's. OUT_DIR may be a file:// URI (shared storage). --bad-data first
starts a run on shards with a bad row past the checked sample: it must fail, naming the shard,
row and field, before any actor starts. With --remove-node the node holding learner rank 1 is removed after the
step that saved checkpoint-2 and a fresh node joins: the run recovers from that checkpoint on
the new placement and finishes. --roles runs instead, on the same kind of cluster, DPO with the
reference precomputed by the Ray Data stage on the `aux_node` node (its cache under OUT_URI), then
online DPO with its reference and HF rollout actors there (prompts: PROMPTS_FILE), both writing
checkpoints and metrics to OUT_URI. Prints one JSON line: where each role ran, the results.
"""

from __future__ import annotations

import json
import sys


def learner_nodes() -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "PolicyLearner"), ("state", "=", "ALIVE")])
    return sorted(a.node_id for a in actors)


def tokenize_nodes() -> list[str]:
    from ray.util.state import list_tasks

    return sorted({t.node_id for t in list_tasks(filters=[("name", "=", "_tokenize_piece")], limit=1000)})


def bad_data_error(cfg_for, bad_uri: str) -> str:
    from rayalign.data import DataError
    from rayalign.drivers import offline, runner

    try:
        runner.run(offline.job_for(cfg_for(bad_uri, "bad")))
    except DataError as exc:
        return str(exc)
    raise AssertionError("a bad row in a later shard did not fail the run")


def actor_nodes(name_part: str, alive_only: bool = False) -> list[str]:
    """Nodes of the actors (alive, or also finished ones) whose class name contains `name_part`."""
    from ray.util.state import list_actors

    return sorted({a.node_id for a in list_actors(limit=1000) if name_part in (a.class_name or "")
                   and (a.state == "ALIVE" or not alive_only)})


LEARNER_NODE = {"learner_node": 1}


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1, resources=LEARNER_NODE) for _ in range(4)]
    aux = cluster.add_node(num_cpus=2, resources={"aux_node": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    return cluster, workers, aux


def roles(model_dir: str, data_uri: str, out_uri: str, prompts: str) -> None:
    """Precompute DPO and online DPO with the reference / rollouts on the aux node."""
    import ray

    from rayalign.config import DPOConfig, OnlineDPOConfig, load_config
    from rayalign.drivers import offline, online, runner

    cluster, _, aux = start_cluster()
    common = {"model_name_or_path": model_dir, "max_steps": 3, "per_device_train_batch_size": 2,
              "learning_rate": 5e-4, "save_steps": 3, "logging_steps": 1, "max_length": 64,
              "gradient_checkpointing": False, "logging": {"report_to": [], "progress_bar": False},
              "learner": {"num_actors": 2, "num_cpus_per_actor": 1, "resources": LEARNER_NODE,
                          "collective_timeout_s": 60}}
    pre = load_config(DPOConfig, None, {
        **common, "train_dataset": data_uri, "output_dir": f"{out_uri}/precompute",
        "reference": {"mode": "precompute", "num_cpus_per_actor": 1, "resources": {"aux_node": 1},
                      "cache_dir": f"{out_uri}/ref-cache", "precompute_schedule": "stream"}})
    seen = {"aux": aux.node_id, "head": cluster.head_node.node_id}
    alive: dict = {}

    def on_step(record) -> None:  # where each role's actors of this run are
        if record.step == 1:
            alive.update({cls: actor_nodes(cls, alive_only=True) for cls in ("PolicyLearner", "Reference", "Rollout")})

    result = runner.run(offline.job_for(pre), on_step=on_step)
    seen["precompute"] = {"checkpoint": result["checkpoint"], "reference_cache": result.get("reference_cache"),
                          "stage_nodes": actor_nodes("ReferenceLogpsStage"), "learner_nodes": alive["PolicyLearner"]}
    on = load_config(OnlineDPOConfig, None, {
        **common, "train_dataset": prompts, "output_dir": f"{out_uri}/online", "max_new_tokens": 8,
        "reward_funcs": ["rayalign.demo.task:demo_reward"],
        "reference": {"mode": "actor", "num_cpus_per_actor": 1, "resources": {"aux_node": 1}},
        "rollout": {"backend": "hf", "num_actors": 1, "num_cpus_per_actor": 1, "resources": {"aux_node": 1}}})
    result = online.train_online(on, on_step=on_step)
    seen["online"] = {"checkpoint": result["checkpoint"], "rollout_nodes": alive["Rollout"],
                      "reference_nodes": alive["Reference"], "learner_nodes": alive["PolicyLearner"]}
    print(json.dumps(seen))
    ray.shutdown()
    cluster.shutdown()


def main(model_dir: str, data_file: str, out_dir: str, remove_node: bool, bad_data: str | None) -> None:
    import ray

    cluster, workers, aux = start_cluster()

    from rayalign.config import DPOConfig, load_config
    from rayalign.drivers import offline, runner

    def cfg_for(data: str, out: str):
        return load_config(DPOConfig, None, {
            "model_name_or_path": model_dir, "train_dataset": data, "output_dir": out,
            "max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 5e-4, "save_steps": 2,
            "logging_steps": 1, "max_length": 64, "gradient_checkpointing": False, "max_failures": 2,
            "logging": {"report_to": [], "progress_bar": False},
            "learner": {"num_actors": 2, "num_cpus_per_actor": 1, "collective_timeout_s": 60,
                        "resources": LEARNER_NODE},
            "reference": {"mode": "actor", "num_cpus_per_actor": 1, "resources": {"aux_node": 1}}})

    seen: dict = {"placements": []}
    if bad_data:
        seen["bad_data_error"] = bad_data_error(lambda d, name: cfg_for(d, f"{out_dir}-{name}"), bad_data)
    cfg = cfg_for(data_file, out_dir)

    def on_step(record) -> None:
        if record.step in (0, 3):  # where the learners run, before and after the recovery
            seen["placements"].append(learner_nodes())
        if remove_node and record.step == 2 and "removed" not in seen:  # checkpoint-2 is saved
            victim = next(w for w in workers if w.node_id == learner_nodes()[-1])
            cluster.remove_node(victim, allow_graceful=False)
            cluster.add_node(num_cpus=1, resources=LEARNER_NODE)
            seen["removed"] = victim.node_id

    result = runner.run(offline.job_for(cfg), on_step=on_step)
    head = cluster.head_node.node_id
    print(json.dumps({**seen, "head": head, "tokenize_nodes": tokenize_nodes(), "checkpoint": result["checkpoint"],
                      "aux": aux.node_id, "reference_nodes": actor_nodes("Reference"),
                      "metrics": {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    flags = sys.argv[4:]
    if "--roles" in flags:
        roles(sys.argv[1], sys.argv[2], sys.argv[3], flags[flags.index("--roles") + 1])
        sys.exit(0)
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--remove-node" in flags,
         flags[flags.index("--bad-data") + 1] if "--bad-data" in flags else None)
