"""A DPO run on a real multi-node Ray started on this machine (`ray.cluster_utils.Cluster`),
run by tests/multinode/test_multinode.py in a process of its own (its Ray is not the suite's).

    python tests/multinode/job.py MODEL_DIR DATA_URI OUT_DIR [--remove-node] [--bad-data URI]

The head node, where the driver runs, has no CPU, so no learner or reference fits there; four
1-CPU worker nodes take the two learners (gloo rendezvous across nodes), the reference actor
and Ray Data's tasks. The training data (DATA_URI: a directory of Parquet shards, as a file://
URI) is tokenized by Ray tasks on the worker nodes, never on the driver's. --bad-data first
starts a run on shards with a bad row past the checked sample: it must fail, naming the shard,
row and field, before any actor starts. With --remove-node the node holding learner rank 1 is removed after the
step that saved checkpoint-2 and a fresh node joins: the run recovers from that checkpoint on
the new placement and finishes. Prints one JSON line: where the learners ran, the result.
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


def main(model_dir: str, data_file: str, out_dir: str, remove_node: bool, bad_data: str | None) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(4)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    from rayalign.config import DPOConfig, load_config
    from rayalign.drivers import offline, runner

    def cfg_for(data: str, out: str):
        return load_config(DPOConfig, None, {
            "model_name_or_path": model_dir, "train_dataset": data, "output_dir": out,
            "max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 5e-4, "save_steps": 2,
            "logging_steps": 1, "max_length": 64, "gradient_checkpointing": False, "max_failures": 2,
            "logging": {"report_to": [], "progress_bar": False},
            "learner": {"num_actors": 2, "num_cpus_per_actor": 1, "collective_timeout_s": 60},
            "reference": {"mode": "actor", "num_cpus_per_actor": 1}})

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
            cluster.add_node(num_cpus=1)
            seen["removed"] = victim.node_id

    result = runner.run(offline.job_for(cfg), on_step=on_step)
    head = cluster.head_node.node_id
    print(json.dumps({**seen, "head": head, "tokenize_nodes": tokenize_nodes(), "checkpoint": result["checkpoint"],
                      "metrics": {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    flags = sys.argv[4:]
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--remove-node" in flags,
         flags[flags.index("--bad-data") + 1] if "--bad-data" in flags else None)
