"""check_model_dir: what a local model dir must hold before any actor loads it (config.json,
readable safetensors headers with all their data, no custom code without trust_remote_code,
a tokenizer that fits the embedding). Reads headers only; sharded dirs pass."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from rayalign.models.loading import ModelLoadError, check_model_dir, check_safetensors, load_tokenizer


@pytest.fixture(scope="module")
def sharded_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def test_tiny_model_and_its_tokenizer_pass(tiny_model_dir):
    check_model_dir(tiny_model_dir, "model_name_or_path", tokenizer=load_tokenizer(tiny_model_dir))


def test_sharded_safetensors_pass(sharded_dir):
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
    check_model_dir(str(sharded_dir), "model_name_or_path", tokenizer=load_tokenizer(str(sharded_dir)))


def test_a_truncated_or_missing_shard_is_named(sharded_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match=rf"model_name_or_path: .*{shard.name} is truncated"):
        check_model_dir(str(broken), "model_name_or_path")
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"names shards that are missing: \['{shard.name}'\]"):
        check_model_dir(str(broken), "model_name_or_path")


HEADER = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()  # 16 data bytes


@pytest.mark.parametrize("content, match", [
    (b"\x01\x02", "truncated or not a safetensors file"),
    (struct.pack("<Q", 10**6) + b"{}", "header claims 1000000 bytes"),
    (struct.pack("<Q", 4) + b"nope", "unreadable safetensors header"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", len(HEADER)) + HEADER + b"\0" * 8, f"the header describes {8 + len(HEADER) + 16}"),
])
def test_bad_safetensors_files(tmp_path, content, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        check_safetensors(path, "model_name_or_path")


def test_a_hub_id_is_left_to_from_pretrained():
    check_model_dir("Qwen/Qwen2.5-0.5B", "model_name_or_path")  # no network: nothing local to read


# ----------------------------------------------------------------------------- where drivers call it


@pytest.fixture(scope="module")
def truncated_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "truncated-rm"
    shutil.copytree(tiny_model_dir, out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return out


def test_reward_model_and_judge_dirs_are_checked_with_their_own_tokenizer(tiny_model_dir, truncated_dir, tmp_path):
    from rayalign.config import JudgeConfig
    from rayalign.rewards import check_reward_sources
    from rayalign.rewards.judges import check_judge_model

    check_reward_sources(["rayalign.demo.task:demo_reward", tiny_model_dir])
    with pytest.raises(ModelLoadError, match=r"reward_funcs\[1\]: .*truncated-rm/model.safetensors is truncated"):
        check_reward_sources(["rayalign.demo.task:demo_reward", str(truncated_dir)])
    big = tmp_path / "rm-big-tokenizer"
    shutil.copytree(tiny_model_dir, big)
    tok = load_tokenizer(tiny_model_dir)
    tok.add_tokens(["<x1>", "<x2>"])
    tok.save_pretrained(big)
    with pytest.raises(ModelLoadError, match=r"judge.model_name_or_path: the tokenizer has \d+ tokens but"):
        check_judge_model(JudgeConfig(model_name_or_path=str(big)))


def test_eval_refuses_a_truncated_model_before_ray(truncated_dir, demo_data_dir, tmp_path, monkeypatch):
    import ray

    import rayalign

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_was_up = ray.is_initialized()
    out = tmp_path / "eval"
    with pytest.raises(ModelLoadError, match=r"models \(truncated-rm\): .*model.safetensors is truncated"):
        rayalign.evaluate({"models": [str(truncated_dir)], "eval_dataset": f"{demo_data_dir}/sft_eval.jsonl",
                           "output_dir": str(out), "checker": "rayalign.demo.task:check_answers"})
    assert not out.exists()
    if not ray_was_up:
        assert not ray.is_initialized()
