"""Table-driven bad input: each case must fail with an error naming the culprit, before any
actor starts, and leave the output dir (a finished checkpoint and metrics) byte-for-byte as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import rayalign
from rayalign import checkpoint as ckpt
from tests.helpers import snapshot


def _rows(demo_data_dir, name, n=64):
    return Path(demo_data_dir, name).read_text().splitlines()[:n]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    good = _rows(demo_data_dir, "pref_train.jsonl")
    (d / "good.jsonl").write_text("\n".join(good) + "\n")
    (d / "conv.jsonl").write_text("\n".join(_rows(demo_data_dir, "pref_train_conversational.jsonl")) + "\n")
    (d / "bad_json.jsonl").write_text(good[0] + "\n{not json\n")
    row = json.loads(good[0])
    (d / "no_chosen.jsonl").write_text(json.dumps({"prompt": row["prompt"], "rejected": row["rejected"]}) + "\n")
    (d / "chosen_number.jsonl").write_text(json.dumps({**row, "chosen": 3}) + "\n")
    (d / "one_row.jsonl").write_text(good[0] + "\n")
    (d / "empty_prompt_implicit.jsonl").write_text(json.dumps({"chosen": "abc", "rejected": "xyz"}) + "\n")
    no_template = d / "tok-no-template"
    shutil.copytree(tiny_model_dir, no_template)
    for f in no_template.glob("chat_template.jinja"):
        f.unlink()
    cfg_file = no_template / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tc))
    no_eos = d / "tok-no-eos"
    shutil.copytree(tiny_model_dir, no_eos)
    tc = json.loads((no_eos / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    tc["pad_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "weights-only").mkdir()
    (d / "adapter").mkdir()  # a PEFT adapter dir is recognised by its adapter_config.json
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": tiny_model_dir, "r": 4, "target_modules": ["q_proj"]}))
    _bad_model_dirs(d, tiny_model_dir)
    _margin_files(d, good)
    old = d / "old-format-staged"  # a checkpoint of an older rayalign: DeepSpeed's pickled state
    (old / "deepspeed" / "state").mkdir(parents=True)
    (old / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"pickle")
    (old / "trainer_state.json").write_text('{"step": 1, "log_history": []}')
    ckpt.commit_checkpoint(str(old), str(d / "old-run"), "checkpoint-1", step=1)
    return d


def _bad_model_dirs(d: Path, tiny_model_dir: str) -> None:
    """Copies of the tiny model, each broken in one way from_pretrained would hit in an actor."""
    truncated = d / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    pickle_only = d / "pickle-only"
    shutil.copytree(tiny_model_dir, pickle_only)
    (pickle_only / "model.safetensors").unlink()
    (pickle_only / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not loaded")  # never unpickled
    remote_code = d / "remote-code"
    shutil.copytree(tiny_model_dir, remote_code)
    config = json.loads((remote_code / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (remote_code / "config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])  # 8 ids past the model's embedding
    tok.save_pretrained(d / "tok-too-big")


def _margin_files(d: Path, good: list[str]) -> None:
    rows = [json.loads(line) for line in good[:16]]
    for name, bad in (("nan", float("nan")), ("inf", float("inf"))):  # json writes NaN / Infinity
        (d / f"margin_{name}.jsonl").write_text("".join(
            json.dumps({**r, "margin": bad if i == 3 else 1.0}) + "\n" for i, r in enumerate(rows)))
    (d / "margin_some.jsonl").write_text("".join(
        json.dumps(r if i in (5, 9) else {**r, "margin": 1.0}) + "\n" for i, r in enumerate(rows)))


# (id, overrides, error class name, what the message must name)
CASES = [
    ("beta-zero", {"beta": 0.0}, "ConfigError", "beta"),
    ("beta-negative", {"beta": -1}, "ConfigError", "beta"),
    ("label-smoothing-range", {"label_smoothing": 0.7}, "ConfigError", "label_smoothing"),
    ("unknown-loss-type", {"loss_type": "magic"}, "ConfigError", "loss_type"),
    ("unknown-key", {"betta": 0.1}, "ConfigError", "betta"),
    ("wrong-type", {"max_steps": "ten"}, "ConfigError", "max_steps"),
    ("zero-stage", {"learner": {"zero_stage": 5}}, "ConfigError", "learner.zero_stage"),
    ("reference-mode", {"reference": {"mode": "magic"}}, "ConfigError", "reference.mode"),
    ("implicit-without-lora", {"reference": {"mode": "implicit"}}, "ConfigError", "reference.mode"),
    ("lora-with-separate-reference", {"lora": {"enabled": True}, "reference": {"mode": "actor"}}, "ConfigError",
     "force_use_ref_model"),
    ("ref-adapter-without-lora", {"ref_adapter_name": "reference"}, "ConfigError", "ref_adapter_name"),
    ("ref-adapter-and-forced-model", {"lora": {"enabled": True}, "ref_adapter_name": "reference",
                                      "force_use_ref_model": True}, "ConfigError", "ref_adapter_name"),
    ("adapter-dir-without-lora", {"model_name_or_path": "{d}/adapter"}, "ConfigError", "lora.enabled"),
    ("batch-size", {"per_device_train_batch_size": 0}, "ConfigError", "per_device_train_batch_size"),
    ("f-divergence", {"f_divergence_type": "chi2"}, "ConfigError", "f_divergence_type"),
    ("report-to", {"logging": {"report_to": ["comet"]}}, "ConfigError", "logging.report_to"),
    ("max-failures", {"max_failures": -1}, "ConfigError", "max_failures"),
    ("missing-model", {"model_name_or_path": "{d}/no-such-model"}, "ModelLoadError", "no-such-model"),
    ("model-dir-without-files", {"model_name_or_path": "{d}/weights-only"}, "ModelLoadError", "weights-only"),
    ("tokenizer-without-eos", {"tokenizer_name_or_path": "{d}/tok-no-eos"}, "ModelLoadError", "eos"),
    ("missing-train-file", {"train_dataset": "{d}/nope.jsonl"}, "DataError", "train_dataset"),
    ("missing-eval-file", {"eval_dataset": "{d}/nope.jsonl"}, "DataError", "eval_dataset"),
    ("invalid-json", {"train_dataset": "{d}/bad_json.jsonl"}, "DataError", "bad_json.jsonl row 1"),
    ("row-without-chosen", {"train_dataset": "{d}/no_chosen.jsonl"}, "DataError", "row 0, field 'chosen'"),
    ("chosen-not-text", {"train_dataset": "{d}/chosen_number.jsonl"}, "DataError", "chosen"),
    ("no-shared-prefix", {"train_dataset": "{d}/empty_prompt_implicit.jsonl"}, "DataError", "prompt"),
    ("too-few-rows", {"train_dataset": "{d}/one_row.jsonl"}, "DataError", "too few"),
    ("chat-template-missing", {"train_dataset": "{d}/conv.jsonl", "eval_dataset": None,
                               "tokenizer_name_or_path": "{d}/tok-no-template"}, "DataError", "chat template"),
    ("resume-missing", {"resume_from_checkpoint": "{d}/no-such-checkpoint"}, "CheckpointError", "no-such-checkpoint"),
    ("unreachable-ray", {"ray": {"address": "127.0.0.1:1"}}, "ClusterError", "ray.address"),
    ("truncated-safetensors", {"model_name_or_path": "{d}/truncated", "tokenizer_name_or_path": "{d}/truncated"},
     "ModelLoadError", "truncated/model.safetensors is truncated"),
    ("pickle-only-model", {"model_name_or_path": "{d}/pickle-only"}, "ModelLoadError",
     "pytorch_model.bin), no model.safetensors. rayalign loads safetensors only"),
    ("auto-map-without-trust", {"model_name_or_path": "{d}/remote-code"}, "ModelLoadError", "trust_remote_code=true"),
    ("tokenizer-larger-than-embedding", {"tokenizer_name_or_path": "{d}/tok-too-big"}, "ModelLoadError",
     "tokenizer_name_or_path: the tokenizer has 309 tokens"),
    ("negative-seed", {"seed": -1}, "ConfigError", "seed"),
    ("margin-nan", {"train_dataset": "{d}/margin_nan.jsonl", "eval_dataset": None}, "DataError",
     "margin_nan.jsonl row 3, field 'margin': must be finite, got nan"),
    ("margin-inf", {"train_dataset": "{d}/margin_inf.jsonl", "eval_dataset": None}, "DataError",
     "margin_inf.jsonl row 3, field 'margin': must be finite, got inf"),
    ("margin-on-some-rows", {"train_dataset": "{d}/margin_some.jsonl", "eval_dataset": None}, "DataError",
     "margin_some.jsonl: field 'margin' is set on 14 rows but missing (or null) on 2, e.g. rows [5, 9]"),
    ("rerun-into-finished-run", {"overwrite_output_dir": False}, "OutputDirError", "holds another run"),
    ("resume-at-the-end", {"resume_from_checkpoint": "latest"}, "CheckpointError", "nothing is left to train"),
    ("resume-old-pickle-format", {"resume_from_checkpoint": "{d}/old-run/checkpoint-1"}, "CheckpointError",
     "older rayalign version"),
]


def _fill(value, d):
    if isinstance(value, str):
        return value.replace("{d}", str(d))
    if isinstance(value, dict):
        return {k: _fill(v, d) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case, over, error, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_early_and_touches_nothing(case, over, error, culprit, inputs, tiny_model_dir,
                                                         tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    (staged / "trainer_state.json").write_text('{"step": 2, "log_history": []}')
    ckpt.commit_checkpoint(str(staged), str(out), "checkpoint-2", step=2)
    (out / "metrics.jsonl").write_text('{"step": 2, "loss": 0.69}\n')
    before = snapshot(out)
    cfg = {"model_name_or_path": tiny_model_dir, "train_dataset": str(inputs / "good.jsonl"),
           "eval_dataset": str(inputs / "good.jsonl"), "output_dir": str(out), "max_steps": 2,
           "per_device_train_batch_size": 8, "max_length": 64, "logging": {"progress_bar": False},
           "reference": {"mode": "none"}, "ray": {"placement_timeout_s": 5},
           # replacing the finished run is allowed: every case must fail before it is touched
           "overwrite_output_dir": True}
    for key, value in _fill(over, inputs).items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    import ray

    ray_was_up = ray.is_initialized()  # the suite's shared local Ray may already be running
    with pytest.raises(Exception) as info:
        rayalign.train_dpo(cfg)
    assert type(info.value).__name__ == error, repr(info.value)
    assert culprit in str(info.value), str(info.value)
    assert snapshot(out) == before
    if not ray_was_up:
        assert not ray.is_initialized(), "Ray was started before the input was checked"


def test_a_missing_relative_model_dir_fails_at_once_naming_the_model_field(demo_data_dir, tmp_path, monkeypatch):
    """`outputs/sft-tiny` before the SFT job wrote it: "outputs" is a directory here, so this is a
    local path, not a hub id; the error names the field the user set (the tokenizer defaults to
    the model), and comes before the hub client's offline retries (~30 s)."""
    import time

    from rayalign.models.loading import ModelLoadError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"^model_name_or_path: path does not exist: outputs/sft-tiny$"):
        rayalign.train_dpo({"model_name_or_path": "outputs/sft-tiny", "output_dir": str(tmp_path / "out"),
                            "train_dataset": f"{demo_data_dir}/pref_train.jsonl"})
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()
