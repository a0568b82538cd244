"""Checkpoints: atomic commit, damaged/partial detection, `latest` fallback, pruning, URIs, RNG."""

import json
import os
import random
import shutil

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
