"""Run configuration: frozen, validated dataclasses — the one source of truth for defaults.

TRL's DPOConfig / TrainingArguments names stay flat and top-level (`output_dir`,
`max_steps`, `beta`, `loss_type`, ...), so `--output_dir X --max_steps 5` works as with
TRL's scripts. Ray resources and per-role settings are nested sections (`--ray.address`,
`--learner.num_actors`, `--reference.mode`). YAML files and CLI overrides only override:
unknown keys, wrong types and out-of-range values raise `ConfigError` naming the field.

The package is split by concern: `base` (errors, checks, shared sections), `train` (SFT,
DPO, reward), `sampling` (rollouts, sampling fields, judges, scoring), `online`, `eval`
and `loading` (YAML + CLI overrides). Everything is importable from `rayalign.config`.
"""

from rayalign.config.base import (REFERENCE_MODES, ConfigError, LearnerConfig, LoggingConfig, LoraConfig,
                                  RayConfig, ReferenceConfig, is_adapter_dir)
from rayalign.config.eval import EVAL_MODEL_KEYS, EvalConfig
from rayalign.config.loading import deep_merge, from_dict, load_config, parse_overrides, to_dict, to_yaml
from rayalign.config.online import OnlineDPOConfig
from rayalign.config.sampling import (DEFAULT_JUDGE_TEMPLATE, JudgeConfig,
                                      RolloutConfig, SamplingConfig, ScoringConfig)
from rayalign.config.train import SCHEDULERS, DPOConfig, RewardConfig, SFTConfig, TrainConfig

__all__ = ["REFERENCE_MODES", "ConfigError", "LearnerConfig", "LoggingConfig", "LoraConfig", "RayConfig",
           "ReferenceConfig", "is_adapter_dir", "EVAL_MODEL_KEYS", "EvalConfig", "deep_merge", "from_dict",
           "load_config", "parse_overrides", "to_dict", "to_yaml", "OnlineDPOConfig", "DEFAULT_JUDGE_TEMPLATE",
           "JudgeConfig", "RolloutConfig", "SamplingConfig", "ScoringConfig", "SCHEDULERS",
           "DPOConfig", "RewardConfig", "SFTConfig", "TrainConfig"]
