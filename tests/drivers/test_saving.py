"""What a run saves: a model sharded by save_max_shard_size (save_pretrained's max_shard_size)
publishes every shard into output_dir, which then loads with from_pretrained and holds the
last checkpoint's weights; save_only_model checkpoints hold the model files only, as
transformers', and resuming one fails before Ray starts with an error naming
resume_from_checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rayalign
from rayalign import checkpoint as ckpt
from rayalign import rundir
from tests.helpers import write_head

pytestmark = pytest.mark.slow


def config(tiny_model_dir: str, data: Path, out: Path, **over) -> dict:
    return {"model_name_or_path": tiny_model_dir, "train_dataset": str(data), "output_dir": str(out),
            "max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
            "lr_scheduler_type": "constant", "logging_steps": 1, "max_length": 64, "gradient_checkpointing": False,
            "save_max_shard_size": "200KB", "save_only_model": True,
            "logging": {"progress_bar": False, "report_to": []}, "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
            **over}


@pytest.fixture(scope="module")
def run(ray_local, tiny_model_dir, demo_data_dir, tmp_path_factory):
    """2 SFT steps of the tiny model (~600 KB of weights) in 200 KB shards, checkpoints model-only."""
    root = tmp_path_factory.mktemp("saving")
    data = write_head(Path(demo_data_dir, "sft_train.jsonl"), root / "train.jsonl", 32)
    out = root / "run"
    rayalign.train_sft(config(tiny_model_dir, data, out))
    return data, out


def weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def test_a_sharded_model_publishes_every_shard_and_loads(run):
    import torch

    _, out = run
    index = json.loads((out / ckpt.WEIGHT_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all(ckpt.SHARD.fullmatch(s) for s in shards)
    assert all((out / s).is_file() for s in shards) and not (out / "model.safetensors").exists()
    for s in shards:  # byte for byte the last checkpoint's
        assert (out / s).read_bytes() == (out / "checkpoint-2" / s).read_bytes()
    assert sorted(ckpt.model_files(str(out))) == sorted(ckpt.model_files(str(out / "checkpoint-2")))
    published, last, first = weights(out), weights(out / "checkpoint-2"), weights(out / "checkpoint-1")
    assert published.keys() == last.keys()
    assert all(torch.equal(published[k], last[k]) for k in last)
    assert any(not torch.equal(published[k], first[k]) for k in first)  # it trained: not the first step's
    assert set(shards) <= set(rundir.run_entries(str(out)))  # the run's files: overwrite removes them


def test_save_only_model_checkpoints_hold_the_model_only_and_are_not_resumed(run, tiny_model_dir):
    data, out = run
    for step in (1, 2):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert ckpt.WEIGHT_INDEX in names and "trainer_state.json" in names and "config.json" in names
        assert ckpt.LEARNER_STATE not in names and not any(n.startswith("rng_state") for n in names)
    with pytest.raises(ckpt.CheckpointError, match="^resume_from_checkpoint=latest: .*save_only_model"):
        rayalign.train_sft(config(tiny_model_dir, data, out, max_steps=3, resume_from_checkpoint="latest"))
