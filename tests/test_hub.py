"""push_to_hub with transformers' meaning: the repo (hub_model_id, default output_dir's
basename; hub_private_repo) is created when the run starts, and output_dir's model — every
model file including each shard of a sharded save, the README.md model card, trainer_state.json
and the *_results.json files, never checkpoints or logs — is uploaded after every save
(hub_strategy every_save) and at the end, to hub_revision with hub_token.

The Hugging Face Hub cannot be reached from the test machines, so `huggingface_hub.HfApi` is
replaced by a fake that records each call and the files of each uploaded folder; everything
else (the run, Ray, the files) is real."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from rayalign import checkpoint as ckpt
from rayalign import hub
from rayalign.config import ConfigError, SFTConfig, from_dict, to_yaml
from tests.helpers import write_head

REQUIRED = {"model_name_or_path": "m", "train_dataset": "d.jsonl"}


class FakeHfApi:
    """Records `create_repo` and `upload_folder` (with the sha256 of every uploaded file)."""

    calls: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        with self.lock:
            self.calls.append(("create_repo", {"repo_id": repo_id, "token": token, "private": private,
                                               "exist_ok": exist_ok}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"fake-user/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, token=None, revision=None, **kwargs):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, folder_path)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        card = Path(folder_path, "README.md").read_text() if "README.md" in files else None
        with self.lock:
            self.calls.append(("upload_folder", {"repo_id": repo_id, "commit_message": commit_message, "token": token,
                                                 "revision": revision, "files": files, "card": card, **kwargs}))
        return SimpleNamespace(commit_url="https://hub.invalid/commit")


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.calls


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- config


def test_hub_fields_have_transformers_defaults_and_checks(tmp_path):
    cfg = from_dict(SFTConfig, {**REQUIRED, "output_dir": str(tmp_path / "my-run")})
    assert (cfg.push_to_hub, cfg.hub_strategy, cfg.hub_private_repo, cfg.hub_always_push) == (False, "every_save",
                                                                                              None, False)
    assert cfg.hub_repo_name == "my-run"  # output_dir's basename
    assert from_dict(SFTConfig, {**REQUIRED, "hub_model_id": "org/x"}).hub_repo_name == "org/x"
    for strategy in ("checkpoint", "all_checkpoints"):
        with pytest.raises(ConfigError, match=f"^hub_strategy: got '{strategy}'; allowed: 'end', 'every_save'"):
            from_dict(SFTConfig, {**REQUIRED, "push_to_hub": True, "hub_strategy": strategy})
    with pytest.raises(ConfigError, match="^save_on_interrupt: .*save_only_model"):
        from_dict(SFTConfig, {**REQUIRED, "save_only_model": True, "save_on_interrupt": True})


def test_hub_token_is_never_written_to_files(tmp_path):
    cfg = from_dict(SFTConfig, {**REQUIRED, "push_to_hub": True, "hub_token": "hf_secret"})
    assert cfg.hub_token == "hf_secret" and "hf_secret" not in repr(cfg)
    ckpt.save_run_config(str(tmp_path), cfg)
    assert "hf_secret" not in (tmp_path / "rayalign_config.yaml").read_text()
    assert ckpt.config_dict(cfg)["hub_token"] is None and "hf_secret" in to_yaml(cfg)  # to_dict itself keeps it


def test_push_output_dir_uploads_the_model_files_card_and_results(fake_hub, tmp_path):
    """An output_dir without a run (eval-free publishing): only model, card and results files go."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (out / ckpt.WEIGHT_INDEX).write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}))
    for name in (*shards, "config.json", "tokenizer.json", "README.md", "eval_results.json", "metrics.jsonl",
                 "checkpoint-3/config.json", ".rayalign.lock"):
        (out / name).write_text(name)
    assert hub.push_output_dir(str(out), "tiny", private=True, token="t", revision="dev") == "fake-user/tiny"
    (create, created), (upload, uploaded) = fake_hub
    assert (create, created) == ("create_repo", {"repo_id": "tiny", "token": "t", "private": True, "exist_ok": True})
    assert upload == "upload_folder" and uploaded["repo_id"] == "fake-user/tiny"
    assert (uploaded["commit_message"], uploaded["token"], uploaded["revision"]) == ("End of training", "t", "dev")
    assert uploaded["files"] == {name: sha(out / name) for name in (ckpt.WEIGHT_INDEX, *shards, "config.json",
                                                                    "tokenizer.json", "README.md",
                                                                    "eval_results.json")}
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-hub")]  # the snapshot is gone


# ----------------------------------------------------------------------------- a run


@pytest.mark.slow
def test_a_run_pushes_every_save_and_the_final_model(fake_hub, ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    import rayalign

    data = write_head(Path(demo_data_dir, "sft_train.jsonl"), tmp_path / "train.jsonl", 32)
    out = tmp_path / "tiny-sft"
    rayalign.train_sft({
        "model_name_or_path": tiny_model_dir, "train_dataset": str(data), "output_dir": str(out), "max_steps": 2,
        "save_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "max_length": 64,
        "gradient_checkpointing": False, "save_max_shard_size": "200KB", "logging": {"progress_bar": False},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1}, "push_to_hub": True, "hub_private_repo": True,
        "hub_revision": "dev", "hub_token": "hf_secret"})
    creates = [c for name, c in fake_hub if name == "create_repo"]
    uploads = [c for name, c in fake_hub if name == "upload_folder"]
    assert creates == [{"repo_id": "tiny-sft", "token": "hf_secret", "private": True, "exist_ok": True}]
    assert [u["commit_message"] for u in uploads] == ["Training in progress, step 1", "End of training"]
    assert all((u["repo_id"], u["token"], u["revision"]) == ("fake-user/tiny-sft", "hf_secret", "dev")
               for u in uploads)
    final = uploads[-1]["files"]
    index = json.loads((out / ckpt.WEIGHT_INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3
    expected = set(ckpt.model_files(str(out))) | (set(hub.RUN_RESULTS) - {"eval_results.json"})  # no eval data
    assert shards | {ckpt.WEIGHT_INDEX, "config.json", "generation_config.json", "tokenizer.json", "README.md",
                     "rayalign_config.yaml", "trainer_state.json", "train_results.json"} <= set(final)
    assert set(final) == expected
    assert final == {name: sha(out / name) for name in final}  # what output_dir holds at the end
    card = uploads[-1]["card"]
    assert f"base_model: {tiny_model_dir}" in card and "# Model trained with rayalign (SFT)" in card
    # the step-1 push: checkpoint-1's model, as published into output_dir then
    assert {n: h for n, h in uploads[0]["files"].items() if n in shards} == \
        {n: sha(out / "checkpoint-1" / n) for n in shards}
    leaked = [p for p in out.rglob("*") if p.is_file() and b"hf_secret" in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.parametrize("always", [False, True])
def test_a_save_push_while_one_runs_is_skipped_unless_hub_always_push(fake_hub, monkeypatch, tmp_path, always):
    """transformers' `_push_from_checkpoint`: a running push makes the next save's push skip it;
    hub_always_push queues it instead. The final (blocking) push waits for the running one."""
    release = threading.Event()
    upload = FakeHfApi.upload_folder

    def slow_upload(self, **kwargs):
        release.wait(10)
        return upload(self, **kwargs)

    monkeypatch.setattr(FakeHfApi, "upload_folder", slow_upload)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    pusher = hub.HubPusher(from_dict(SFTConfig, {**REQUIRED, "output_dir": str(out), "push_to_hub": True,
                                                 "hub_always_push": always}))
    pusher.push("Training in progress, step 1")
    pusher.push("Training in progress, step 2")
    release.set()
    pusher.push("End of training", blocking=True)
    pusher.close()
    messages = [c["commit_message"] for name, c in fake_hub if name == "upload_folder"]
    assert messages == ["Training in progress, step 1", *(["Training in progress, step 2"] if always else []),
                        "End of training"]
