"""Checkpoints: atomic commit, damaged/partial detection, `latest` fallback, pruning, URIs, RNG,
and learner state without pickle (round trip, crafted files, old format, exact resume)."""

import enum
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rayalign import checkpoint as ckpt


def stage(root, name, payload=b"weights"):
    d = os.path.join(root, f".staging-{name}")
    os.makedirs(d)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(payload)
    ckpt.save_trainer_state(d, {"step": int(name.split("-")[1])})
    return d


def test_commit_is_atomic_and_latest_skips_broken(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    for step in (10, 20):
        ckpt.commit_checkpoint(stage(out, f"checkpoint-{step}"), out, f"checkpoint-{step}", step=step)
    # a crash mid-save: a half-written temp dir and a checkpoint dir without its marker
    os.makedirs(os.path.join(out, ".tmp-checkpoint-30-dead"))
    os.makedirs(os.path.join(out, "checkpoint-30"))
    (tmp_path / "run" / "checkpoint-30" / "model.safetensors").write_bytes(b"half")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [10, 20]
    assert ckpt.resolve_checkpoint(out, "latest").endswith("checkpoint-20")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(os.path.join(out, "checkpoint-30"))
    # damage the newest complete one: latest falls back to 10, loading 20 names the file
    with open(os.path.join(out, "checkpoint-20", "model.safetensors"), "ab") as f:
        f.write(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.resolve_checkpoint(out, os.path.join(out, "checkpoint-20"))
    assert ckpt.resolve_checkpoint(out, "latest").endswith("checkpoint-10")
    removed = ckpt.prune_checkpoints(out, None)
    assert any(".tmp-checkpoint-30-dead" in r for r in removed)


def test_resave_same_step_replaces_safely(tmp_path):
    out = str(tmp_path)
    ckpt.commit_checkpoint(stage(out, "checkpoint-5", b"old"), out, "checkpoint-5", step=5)
    ckpt.commit_checkpoint(stage(out, "checkpoint-5", b"new"), out, "checkpoint-5", step=5)
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() == b"new"
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_prune_honours_limit_and_keep(tmp_path):
    out = str(tmp_path)
    paths = [ckpt.commit_checkpoint(stage(out, f"checkpoint-{s}"), out, f"checkpoint-{s}", step=s)
             for s in (1, 2, 3, 4)]
    ckpt.prune_checkpoints(out, 2, keep=[paths[0]])
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 4]


def test_file_uri_output_dir(tmp_path):
    uri = f"file://{tmp_path}/remote"
    local = str(tmp_path / "local")
    os.makedirs(local)
    staging = stage(local, "checkpoint-7")
    final = ckpt.commit_checkpoint(staging, uri, "checkpoint-7", step=7)
    assert ckpt.is_complete(final)
    assert ckpt.resolve_checkpoint(uri, "latest").endswith("checkpoint-7")
    assert json.loads((tmp_path / "remote" / "checkpoint-7" / "trainer_state.json").read_text())["step"] == 7


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_rng_state(str(tmp_path), 0)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rng_state(str(tmp_path), 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert not list(tmp_path.glob("*.pkl"))


def test_model_card_and_config(tmp_path):
    from rayalign.config import DPOConfig, from_dict

    cfg = from_dict(DPOConfig, {"model_name_or_path": "base", "train_dataset": "d.jsonl"})
    ckpt.write_model_card(str(tmp_path), base_model="base", datasets=["d.jsonl"], method="DPO",
                          metrics={"eval_loss": 0.5})
    ckpt.save_run_config(str(tmp_path), cfg)
    card = (tmp_path / "README.md").read_text()
    assert "base_model: base" in card and "eval_loss" in card and "0.5" in card
    assert "beta: 0.1" in (tmp_path / "rayalign_config.yaml").read_text()
    shutil.rmtree(tmp_path)


# ----------------------------------------------------------------------------- learner state without pickle


class _Scaler:
    """Stands in for DeepSpeed's loss scaler: an object saved as its plain attributes."""

    def __init__(self, scale=1.0):
        self.cur_scale = scale
        self.cur_iter = 0


class _Stage(enum.IntEnum):
    gradients = 2


def test_state_round_trip_keeps_tensors_dtypes_and_structure(tmp_path):
    state = {
        "tensors": [torch.randn(3, 4), torch.arange(5, dtype=torch.int64), torch.tensor([True, False]),
                    torch.randn(2, dtype=torch.float64).to(torch.bfloat16), torch.tensor(7.0),
                    torch.zeros(0, dtype=torch.float16)],
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
                                        "foreach": None, "params": [0], "name": "decay"}]},
        "shape": torch.Size([2, 3]), "stage": _Stage.gradients, "inf": float("inf"), "big": 2**70,
        "paddings": [[0, 3], (1, 2)], "dtype": torch.bfloat16, "np": np.int64(4),
        "__odd_key": {("a", 1): "tuple key"}, "scaler": _Scaler(4.0),
    }
    shared = torch.arange(6.0)
    state["views"] = [shared[:3], shared[3:]]  # views of one storage (ZeRO's flat buffers)
    ckpt.save_state(str(tmp_path / "s"), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]

    got = ckpt.load_state(str(tmp_path / "s"))
    for want, have in zip(state["tensors"] + state["views"], got["tensors"] + got["views"]):
        assert have.dtype == want.dtype and torch.equal(have, want)
    assert got["optimizer"]["state"][0]["step"].item() == 3.0 and list(got["optimizer"]["state"]) == [0]
    assert got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert {k: v for k, v in got["optimizer"]["param_groups"][0].items() if k != "betas"} == \
        {"lr": 1e-3, "eps": 1e-8, "amsgrad": False, "foreach": None, "params": [0], "name": "decay"}
    assert got["shape"] == (2, 3) and got["stage"] == 2 and got["inf"] == float("inf") and got["big"] == 2**70
    assert got["paddings"] == [[0, 3], (1, 2)] and isinstance(got["paddings"][1], tuple)
    assert got["dtype"] is torch.bfloat16 and got["np"] == 4 and got["__odd_key"] == {("a", 1): "tuple key"}

    # an object comes back as its attributes only, written into this run's live object
    assert got["scaler"] == ckpt.SavedObject(f"{__name__}._Scaler", {"cur_scale": 4.0, "cur_iter": 0})
    live = _Scaler()
    bound = ckpt.restore_objects(got, {"scaler": live})
    assert bound["scaler"] is live and live.cur_scale == 4.0
    with pytest.raises(ckpt.CheckpointError, match="_Scaler"):
        ckpt.restore_objects(got, {"scaler": object()})
    with pytest.raises(TypeError, match="state.fn"):
        ckpt.save_state(str(tmp_path / "f"), {"fn": print})


class _Payload:
    """Unpickling this runs `touch <path>`: what a crafted checkpoint file would carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _recommit(path):
    """Rewrite the completion marker for the files now in `path` (as anyone with write access
    to the storage could), so only the format checks stand in the way."""
    marker = json.loads((path / ckpt.MARKER).read_text())
    (path / ckpt.MARKER).unlink()
    marker["files"] = ckpt._file_list(str(path))
    (path / ckpt.MARKER).write_text(json.dumps(marker))


def _payload(tmp_path, name="pwned"):
    """(pickle bytes that create `<tmp>/<name>` when unpickled, that path); checked to work."""
    probe = tmp_path / "probe"
    probe.mkdir()
    pickle.loads(pickle.dumps(_Payload(probe / "ran")))
    assert (probe / "ran").exists()  # the payload really runs when unpickled
    return pickle.dumps(_Payload(tmp_path / name)), tmp_path / name


@pytest.fixture(scope="module")
def learners(ray_local, tiny_model_dir, demo_data_dir):
    """Build in-process PolicyLearners (one rank of a gloo group in this process) and the
    Ray Data shard they train on."""
    import socket

    import ray

    from rayalign.actors.learner import PolicyLearner
    from rayalign.config import DPOConfig, from_dict
    from rayalign.data import TokenizeSettings, validate_file
    from rayalign.models.loading import load_tokenizer

    table, _ = validate_file(f"{demo_data_dir}/pref_train.jsonl", load_tokenizer(tiny_model_dir),
                             TokenizeSettings(max_length=64))
    shard = ray.data.from_items(table.slice(0, 48).to_pylist()).iterator()

    def make(zero_stage=0, lora=False):
        cfg = {"model_name_or_path": tiny_model_dir, "train_dataset": "unused.jsonl", "max_length": 64,
               "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
               "lr_scheduler_type": "linear", "warmup_steps": 2, "seed": 5,
               "learner": {"num_actors": 1, "zero_stage": zero_stage},
               "reference": {"mode": "implicit" if lora else "none"}}
        if lora:
            cfg["lora"] = {"enabled": True, "r": 4}
        learner = PolicyLearner(from_dict(DPOConfig, cfg), rank=0, world_size=1)
        if not torch.distributed.is_initialized():
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            learner.init_distributed("127.0.0.1", port, 0, 1, "gloo", 120)
        learner.setup(num_training_steps=6)
        return learner

    return make, shard


def _save(learner, root, step):
    staging = root / f".staging-{step}"
    learner.save(str(staging))
    return Path(ckpt.commit_checkpoint(str(staging), str(root), f"checkpoint-{step}", step=step))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,lora", [(0, False), (1, False), (2, True), (3, False)])
def test_learner_resume_gives_the_uninterrupted_losses(learners, tmp_path, zero_stage, lora):
    make, shard = learners
    run = make(zero_stage, lora)
    run.set_data(shard, 0)
    for _ in range(2):
        run.train_step()
    path = _save(run, tmp_path, 2)
    want = [run.train_step()["loss"] for _ in range(2)]
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.pkl")) and not list(path.rglob("*.bin"))
    assert (path / ckpt.LEARNER_STATE / "shared.json").exists()
    assert (path / ckpt.LEARNER_STATE / "rank_0.json").exists() == (zero_stage > 0)
    ckpt.check_resumable(str(path))

    resumed = make(zero_stage, lora)
    resumed.load(str(path))
    resumed.set_data(shard, 0, skip_batches=2 * 2)
    assert int(resumed.engine.global_steps) == 2
    assert [resumed.train_step()["loss"] for _ in range(2)] == want

    fresh = make(zero_stage, lora)  # the same batches without the restored state differ: the test can fail
    fresh.set_data(shard, 0, skip_batches=2 * 2)
    assert [fresh.train_step()["loss"] for _ in range(2)] != want
    for learner in (run, resumed, fresh):
        learner.drain()  # finish the shard's iterators while Ray is up


@pytest.fixture(scope="module")
def zero0(learners, tmp_path_factory):
    """A ZeRO-0 learner and a checkpoint of it after one step."""
    make, shard = learners
    learner = make(0)
    learner.set_data(shard, 0)
    learner.train_step()
    learner.drain()
    return learner, _save(learner, tmp_path_factory.mktemp("ckpt"), 1)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["shared.json", "shared.safetensors"])
def test_a_crafted_state_file_is_refused_and_never_unpickled(zero0, tmp_path, target):
    learner, good = zero0
    path = tmp_path / "checkpoint-1"
    shutil.copytree(good, path)
    payload, marker = _payload(tmp_path)
    (path / ckpt.LEARNER_STATE / target).write_bytes(payload)
    _recommit(path)
    ckpt.check_resumable(str(path))  # complete and in the new layout: the file itself is the attack
    with pytest.raises(ckpt.CheckpointError, match=target.split(".")[1]):
        learner.load(str(path))
    assert not marker.exists()


@pytest.mark.slow
def test_a_pickle_beside_new_state_is_never_opened(zero0, tmp_path):
    learner, good = zero0
    path = tmp_path / "checkpoint-1"
    shutil.copytree(good, path)
    payload, marker = _payload(tmp_path)
    (path / "deepspeed" / "state").mkdir(parents=True)
    (path / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(payload)
    (path / "optimizer.pt").write_bytes(payload)
    _recommit(path)
    learner.load(str(path))
    assert int(learner.engine.global_steps) == 1 and not marker.exists()


@pytest.mark.slow
def test_an_older_pickled_deepspeed_checkpoint_is_refused(zero0, tmp_path):
    learner, good = zero0
    path = tmp_path / "checkpoint-1"
    shutil.copytree(good, path)
    shutil.rmtree(path / ckpt.LEARNER_STATE)
    # what rayalign wrote before: DeepSpeed's own (pickled) files, here with a payload added
    learner.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False)
    payload, marker = _payload(tmp_path)
    (path / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(payload)
    _recommit(path)
    for load in (ckpt.check_resumable, learner.load):
        with pytest.raises(ckpt.CheckpointError, match=r"older rayalign.*pickle.*will\s+not be loaded"):
            load(str(path))
    assert not marker.exists()
    shutil.rmtree(path / "deepspeed")  # weights only: refused too, with its own reason
    _recommit(path)
    with pytest.raises(ckpt.CheckpointError, match="no learner state"):
        ckpt.check_resumable(str(path))
