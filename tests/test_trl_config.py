"""A TRL user's configs load unchanged: TRL's example commands and a recipe YAML through
`load_config`, every field of the installed TRL's DPOConfig / RewardConfig / OnlineDPOConfig and
of its scripts' ScriptArguments / ModelConfig is a rayalign field or in `config.trl.TRL_FIELDS`,
TRL's defaults spelled out are accepted, and docs/trl-fields.md is that table."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from rayalign.config import ConfigError, DPOConfig, OnlineDPOConfig, RewardConfig, load_config, parse_overrides
from rayalign.config.trl import TRL_FIELDS, field_table

trl = pytest.importorskip("trl")
from trl import ModelConfig, ScriptArguments  # noqa: E402
from trl.experimental.online_dpo import OnlineDPOConfig as TRLOnlineDPOConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [(trl.DPOConfig, DPOConfig), (trl.RewardConfig, RewardConfig), (TRLOnlineDPOConfig, OnlineDPOConfig)]
REQUIRED = {"model_name_or_path": "m", "train_dataset": "d.jsonl"}
ONLINE = {"reward_funcs": ["rayalign.demo.task:reward"]}


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _base(ours) -> dict:
    return {**REQUIRED, **(ONLINE if ours is OnlineDPOConfig else {})}


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_every_trl_field_is_covered(theirs, ours):
    mine = {f.name for f in dataclasses.fields(ours)}
    names = {f.name for c in (theirs, ScriptArguments, ModelConfig) for f in dataclasses.fields(c)}
    missing = sorted(n for n in names if n not in mine and n not in TRL_FIELDS)
    assert not missing, f"TRL fields neither rayalign fields nor in TRL_FIELDS: {missing}"


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_trl_defaults_spelled_out_are_accepted(theirs, ours):
    """A recipe may spell out any of TRL's defaults: each one alone, and all of them at once."""
    defaults = {**_defaults(ScriptArguments), **_defaults(ModelConfig), **_defaults(theirs)}
    for name in ("output_dir", "model_name_or_path", "dataset_name", "dataset_config"):  # None in TRL
        defaults.pop(name, None)
    if ours is OnlineDPOConfig:
        defaults.pop("reward_model_path")  # None: the reward comes from reward_funcs here
    if ours is not RewardConfig:
        defaults.pop("lora_task_type")
    defaults.pop("dataloader_drop_last")  # rayalign always drops the last partial batch (documented)
    failures = {}
    for name, value in defaults.items():
        try:
            load_config(ours, None, {**_base(ours), name: value})
        except ConfigError as exc:
            failures[name] = str(exc)
    assert not failures, failures
    cfg = load_config(ours, None, {**_base(ours), **defaults})
    assert cfg.eval_strategy == "no" and cfg.logging.report_to == ()  # TRL's "no" and "none"


def test_trl_dpo_example_command():
    """TRL's documented DPO command (docs: dpo_trainer.md) with `rayalign dpo` for the launcher."""
    argv = shlex.split(
        "--model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized "
        "--learning_rate 5.0e-7 --num_train_epochs 1 --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 8 --gradient_checkpointing --eval_strategy steps --eval_steps 50 "
        "--output_dir Qwen2-0.5B-DPO --no_remove_unused_columns --use_peft --lora_r 32 --lora_alpha 16")
    cfg = load_config(DPOConfig, None, argv)
    assert cfg.learning_rate == 5e-7 and cfg.num_train_epochs == 1 and cfg.gradient_checkpointing
    assert cfg.lora.enabled and (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 16, 0.05)
    assert cfg.reference_mode == "implicit"  # TRL's reference for a PEFT policy: the adapter switched off
    assert str(cfg.train_source) == "trl-lib/ultrafeedback_binarized:train"
    assert str(cfg.eval_source) == "trl-lib/ultrafeedback_binarized:test"
    assert cfg.every("eval", 1000, 100) == 50 and cfg.every("save", 1000, 100) == 500


def test_trl_reward_example_command():
    argv = shlex.split(
        "--model_name_or_path Qwen/Qwen2-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized "
        "--output_dir Qwen2-0.5B-Reward --per_device_train_batch_size 8 --num_train_epochs 1 "
        "--learning_rate 1.0e-5 --eval_strategy steps --eval_steps 50 --max_length 2048 "
        "--use_peft --lora_task_type SEQ_CLS --lora_r 32 --lora_alpha 16")
    cfg = load_config(RewardConfig, None, argv)
    assert cfg.max_length == 2048 and cfg.lora.enabled and cfg.eval_source is not None


def test_trl_online_dpo_example_command():
    argv = shlex.split(
        "--model_name_or_path trl-lib/pythia-1b-deduped-tldr-sft --reward_model_path trl-lib/pythia-1b-deduped-tldr-rm "
        "--dataset_name trl-lib/tldr --learning_rate 5.0e-7 --output_dir pythia-1b-tldr-online-dpo "
        "--per_device_train_batch_size 8 --gradient_accumulation_steps 16 --warmup_ratio 0.1 "
        "--missing_eos_penalty 1.0 --use_vllm --vllm_gpu_memory_utilization 0.4")
    cfg = load_config(OnlineDPOConfig, None, argv)
    assert cfg.reward_sources == ("trl-lib/pythia-1b-deduped-tldr-rm",)
    assert cfg.rollout.backend == "vllm" and cfg.rollout.gpu_memory_utilization == 0.4


def test_hf_argparser_syntax():
    """Lists as several values, --no_<flag>, None, float step ratios (HfArgumentParser's syntax)."""
    argv = shlex.split("--loss_type sigmoid sft --loss_weights 1.0 0.5 --no_bf16 --max_length None "
                       "--warmup_steps 0.1 --logging_steps 0.05 --eval_steps 0.2 --save_steps 0.25 "
                       "--eval_dataset e.jsonl --eval_strategy steps")
    assert parse_overrides(["--no_bf16", "--loss_type", "a", "b"]) == {"bf16": False, "loss_type": ["a", "b"]}
    cfg = load_config(DPOConfig, None, [*argv, "--model_name_or_path", "m", "--train_dataset", "d.jsonl"])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.5)
    assert cfg.bf16 is False and cfg.max_length is None
    assert cfg.warmup(200) == 20
    assert [cfg.every(k, 200, 50) for k in ("logging", "eval", "save")] == [10, 40, 50]
    epochs = load_config(DPOConfig, None, {**REQUIRED, "save_strategy": "epoch", "logging_strategy": "no"})
    assert epochs.every("save", 200, 50) == 50 and epochs.every("logging", 200, 50) is None


def test_trl_recipe_yaml(tmp_path):
    """A recipe in the alignment-handbook style (TRL's own recipe fields), loaded unchanged."""
    path = tmp_path / "dpo-recipe.yaml"
    path.write_text("""\
# Model arguments
model_name_or_path: alignment-handbook/zephyr-7b-sft-full
dtype: bfloat16
attn_implementation: sdpa
# Data arguments
dataset_name: HuggingFaceH4/ultrafeedback_binarized
dataset_train_split: train_prefs
dataset_test_split: test_prefs
dataset_num_proc: 12
# DPOTrainer arguments
bf16: true
beta: 0.01
do_eval: true
eval_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
hub_model_id: zephyr-7b-dpo-full
learning_rate: 5.0e-7
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
num_train_epochs: 1
optim: adamw_torch
output_dir: data/zephyr-7b-dpo-full
per_device_train_batch_size: 8
per_device_eval_batch_size: 8
push_to_hub: false
report_to:
- tensorboard
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
""")
    cfg = load_config(DPOConfig, path)
    assert cfg.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert str(cfg.train_source) == "HuggingFaceH4/ultrafeedback_binarized:train_prefs"
    assert cfg.bf16 and cfg.beta == 0.01 and cfg.logging.report_to == ("tensorboard",)


def test_refused_values_say_what_to_use_and_come_together():
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, {**REQUIRED, "fp16": True, "deepspeed": "ds.json", "torch_compile": True,
                                      "beta": -1, "bogus": 1, "max_steps": "x"})
    lines = str(err.value).splitlines()
    assert len(lines) == 6, lines
    text = str(err.value)
    for name, advice in (("fp16", "use bf16"), ("deepspeed", "learner.zero_stage"),
                         ("torch_compile", "accepted: False"), ("beta", "> 0"), ("bogus", "unknown field"), ("max_steps", "integer")):
        assert any(line.strip().startswith(f"{name}:") and advice in line for line in lines), (name, text)


def test_alias_and_its_target_given_differently_is_an_error():
    with pytest.raises(ConfigError, match="lora_r.*lora.r"):
        load_config(DPOConfig, None, {**REQUIRED, "lora_r": 8, "lora": {"r": 4}})


def test_dataset_name_conflicts_with_train_dataset():
    with pytest.raises(ConfigError, match="dataset_name"):
        load_config(DPOConfig, None, {**REQUIRED, "dataset_name": "org/x"})


def test_eval_strategy_without_eval_data():
    with pytest.raises(ConfigError, match="eval_strategy"):
        load_config(DPOConfig, None, {**REQUIRED, "eval_strategy": "steps"})


def test_online_refuses_fields_it_has_no_use_for():
    for name, value in (("max_prompt_length", 64), ("max_completion_length", 16)):
        with pytest.raises(ConfigError, match=name):
            load_config(OnlineDPOConfig, None, {**REQUIRED, **ONLINE, name: value})


def test_python_api_overrides_merge_by_section():
    from rayalign import _config

    base = load_config(DPOConfig, None, {**REQUIRED, "learner": {"zero_stage": 2}})
    for config in (base, {**REQUIRED, "learner": {"zero_stage": 2}}):
        cfg = _config(DPOConfig, config, {"learner": {"num_actors": 2}})
        assert (cfg.learner.num_actors, cfg.learner.zero_stage) == (2, 2)
    assert _config(DPOConfig, base, ["--beta", "0.3"]).beta == 0.3


def test_docs_field_table_is_current():
    doc = (ROOT / "docs" / "trl-fields.md").read_text()
    assert field_table() in doc, "docs/trl-fields.md is stale: paste rayalign.config.trl.field_table() into it"
    assert "accepted, ignored" not in doc


def test_trl_command_line_trains_through_the_cli(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    """TRL's DPO + LoRA command, `rayalign dpo` as the launcher, on a local dataset dir read by
    load_dataset (dataset_name; its test split evaluates): the run trains the adapter against the
    adapter-off reference, evaluates on the test split and saves the adapter."""
    import json

    from rayalign import cli

    root = tmp_path / "prefs"
    root.mkdir()
    rows = [line for line in open(f"{demo_data_dir}/pref_train.jsonl")]
    (root / "train.jsonl").write_text("".join(rows[:16]))
    (root / "test.jsonl").write_text("".join(rows[16:24]))
    out = tmp_path / "run"
    argv = shlex.split(
        f"dpo --model_name_or_path {tiny_model_dir} --dataset_name {root} --learning_rate 5.0e-4 "
        "--max_steps 4 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --gradient_checkpointing "
        f"--eval_strategy steps --eval_steps 0.5 --output_dir {out} --no_remove_unused_columns --use_peft "
        "--lora_r 4 --lora_alpha 8 --loss_type sigmoid sft --max_length None --no_bf16 --report_to none "
        "--logging_steps 2 --ray.num_cpus 2")
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # eval_steps 0.5 of 4 steps
    assert (out / "adapter_model.safetensors").exists()
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


def test_trl_data_loading_knobs_are_rayalign_fields_or_name_the_one_to_use():
    cfg = load_config(DPOConfig, None, {**REQUIRED, "dataset_num_proc": 4, "dataloader_prefetch_factor": 3,
                                        "dataloader_pin_memory": False, "pad_to_multiple_of": "auto",
                                        "do_eval": True, "remove_unused_columns": False})
    assert (cfg.dataset_num_proc, cfg.dataloader_prefetch_factor, cfg.dataloader_pin_memory) == (4, 3, False)
    with pytest.raises(ConfigError, match=r"dataloader_num_workers: 4 is not supported .*dataset_num_proc"):
        load_config(DPOConfig, None, {**REQUIRED, "dataloader_num_workers": 4})
    with pytest.raises(ConfigError, match=r"dataset_num_proc: must be >= 1"):
        load_config(DPOConfig, None, {**REQUIRED, "dataset_num_proc": 0})


def test_online_dpo_takes_dataset_num_proc_for_its_prompt_tokenize_tasks():
    cfg = load_config(OnlineDPOConfig, None, {**REQUIRED, **ONLINE, "dataset_num_proc": 2})
    assert cfg.dataset_num_proc == 2
