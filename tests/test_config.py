"""Config: defaults, overrides, and errors that name the field — before any Ray work."""

from pathlib import Path

import pytest

from rayalign.config import (ConfigError, DPOConfig, EvalConfig, OnlineDPOConfig, RewardConfig, SFTConfig, from_dict, load_config,
                             parse_overrides, to_dict)

BASE = ["--model_name_or_path", "m", "--train_dataset", "d.jsonl"]
JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))
CLASSES = {"dpo": DPOConfig, "sft": SFTConfig, "reward": RewardConfig, "eval": EvalConfig,
           "online": OnlineDPOConfig}  # online-dpo-*.yaml


def test_overrides_flat_and_nested():
    cfg = load_config(DPOConfig, None, BASE + ["--max_steps", "5", "--learner.num_actors=2",
                                               "--reference.mode", "precompute", "--loss_type",
                                               "[sigmoid, sft]", "--loss_weights", "[1.0, 0.5]"])
    assert cfg.max_steps == 5 and cfg.learner.num_actors == 2
    assert cfg.reference_mode == "precompute"
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.5)


def test_string_loss_type_is_wrapped_like_trl():
    cfg = load_config(DPOConfig, None, BASE + ["--loss_type", "ipo"])
    assert cfg.loss_type == ("ipo",)


def test_precompute_flag_maps_onto_reference_mode():
    cfg = load_config(DPOConfig, None, BASE + ["--precompute_ref_log_probs", "true"])
    assert cfg.reference_mode == "precompute"


@pytest.mark.parametrize("override, field", [
    (["--beta", "0"], "beta"),
    (["--beta", "-1"], "beta"),
    (["--label_smoothing", "0.7"], "label_smoothing"),
    (["--loss_type", "nope"], "loss_type"),
    (["--loss_type", "[sigmoid, ipo]", "--loss_weights", "[1.0]"], "loss_weights"),
    (["--loss_type", "exo_pair"], "label_smoothing"),
    (["--loss_type", "[sigmoid, robust]", "--label_smoothing", "0.5"], "label_smoothing"),
    (["--f_divergence_type", "chi2"], "f_divergence_type"),
    (["--learner.zero_stage", "4"], "learner.zero_stage"),
    (["--learner.num_actors", "0"], "learner.num_actors"),
    (["--reference.mode", "bogus"], "reference.mode"),
    (["--reference.mode", "implicit"], "reference.mode"),
    (["--f_divergence_type", "js_divergence", "--loss_type", "apo_zero"], "f_divergence_type"),
    (["--use_weighting", "true", "--loss_type", "aot"], "use_weighting"),
    (["--truncation_mode", "middle"], "truncation_mode"),
    (["--lr_scheduler_type", "exp"], "lr_scheduler_type"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--bogus_field", "1"], "bogus_field"),
    (["--learner.bogus", "1"], "learner.bogus"),
    (["--beta", "abc"], "beta"),
    (["--learning_rate", "fast"], "learning_rate"),
    (["--max_steps", "1.5"], "max_steps"),
    (["--bf16", "maybe"], "bf16"),
    (["--sync_ref_model", "true", "--reference.mode", "precompute"], "sync_ref_model"),
    (["--lora.enabled", "true", "--learner.zero_stage", "3"], "lora.enabled"),
    (["--lora.enabled", "true", "--reference.mode", "actor"], "reference.mode"),  # needs force_use_ref_model
    (["--ref_adapter_name", "reference"], "ref_adapter_name"),
    (["--lora.enabled", "true", "--ref_adapter_name", "default"], "ref_adapter_name"),
    (["--lora.enabled", "true", "--ref_adapter_name", "reference", "--force_use_ref_model", "true"],
     "ref_adapter_name"),
    (["--lora.enabled", "true", "--force_use_ref_model", "true", "--reference.mode", "implicit"],
     "force_use_ref_model"),
    (["--learner.resources.CPU", "2"], "learner.resources.CPU"),  # CPUs have their own field
    (["--reference.resources.ref_node", "0"], "reference.resources.ref_node"),
    (["--reference.resources.ref_node", "lots"], "reference.resources.ref_node"),
    (["--learner.resources", "gpu_node"], "learner.resources"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, BASE + override)
    assert str(err.value).startswith(field), str(err.value)


def test_custom_resources_load_from_overrides():
    cfg = load_config(DPOConfig, None, BASE + ["--learner.resources.learner_node", "1",
                                               "--reference.resources.ref_node", "0.5"])
    assert cfg.learner.resources == {"learner_node": 1} and cfg.reference.resources == {"ref_node": 0.5}


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="model_name_or_path"):
        load_config(DPOConfig, None, ["--train_dataset", "x"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(DPOConfig, tmp_path / "nope.yaml")


def test_round_trip_through_dict():
    cfg = load_config(DPOConfig, None, BASE + ["--learner.num_actors", "2"])
    assert from_dict(DPOConfig, to_dict(cfg)) == cfg


def test_parse_overrides_bare_flag_and_equals():
    assert parse_overrides(["--a.b=3", "--flag", "--c", "x"]) == {"a": {"b": 3}, "flag": True, "c": "x"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_yaml_loads(path):
    assert path.read_text().startswith("#")  # launch command in a header comment
    kind = path.name.split("-")[0]
    if path.name == "runtime_env.yaml":  # checked in tests/test_cluster.py
        return
    if kind == "sweep":
        from rayalign.sweep import load_sweep_config, trial_config

        sweep = load_sweep_config(path)
        assert trial_config(sweep, {}, "/tmp/check").output_dir == "/tmp/check"
        return
    assert kind in CLASSES, f"{path.name}: job files are named <command>-<name>.yaml"
    cfg = load_config(CLASSES[kind], path)
    assert cfg.output_dir


def test_exponent_without_dot_is_a_number():
    cfg = load_config(DPOConfig, None, BASE + ["--learning_rate", "5e-4"])
    assert cfg.learning_rate == 5e-4
