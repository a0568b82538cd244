"""rayalign: Ray-native preference optimisation (DPO, reward models, online DPO) for causal LMs.

Python API mirroring the CLI: `train_sft`, `train_dpo`, `train_reward`, `train_online_dpo` take a config
(dataclass, dict or YAML path) and return the final metrics and the model directory; `evaluate`
takes an eval config the same way and returns its summary; `evaluate_dpo` / `evaluate_reward`
take a DPO / reward job config and return TRL's `trainer.evaluate()` metrics of its model.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _config(cls, config, overrides=None):
    """`config` (a dataclass, a dict or a YAML path) with `overrides` (a nested dict or CLI-style
    list) merged in, section by section: overriding learner.num_actors keeps learner.zero_stage."""
    from rayalign.config import deep_merge, load_config, parse_overrides, to_dict

    if isinstance(config, cls) and not overrides:
        return config
    if isinstance(config, cls) or isinstance(config, dict):
        base = to_dict(config) if isinstance(config, cls) else _python_values(config)
        extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
        return load_config(cls, None, deep_merge(base, extra))
    return load_config(cls, config, overrides)


def _python_values(config: dict) -> dict:
    """What a dict config may hold beyond YAML values, as TRL's trainers take them: datasets
    (`datasets.Dataset`, row lists, pyarrow Tables) become Parquet files, reward-function
    callables become `module:function` specs."""
    from rayalign.data import materialize
    from rayalign.rewards.function import function_spec

    out = dict(config)
    for name in ("train_dataset", "eval_dataset"):
        if out.get(name) is not None and not isinstance(out[name], str):
            out[name] = materialize(out[name], name)
    if isinstance(out.get("reward_funcs"), (list, tuple)) or callable(out.get("reward_funcs")):
        funcs = out["reward_funcs"] if isinstance(out["reward_funcs"], (list, tuple)) else [out["reward_funcs"]]
        out["reward_funcs"] = [function_spec(f) if callable(f) else f for f in funcs]
    return out


def train_dpo(config, overrides=None) -> dict:
    """Offline DPO on Ray. `config`: DPOConfig, a dict, or a YAML path."""
    from rayalign.config import DPOConfig
    from rayalign.drivers.offline import train

    return train(_config(DPOConfig, config, overrides))


def train_sft(config, overrides=None) -> dict:
    """Supervised fine-tuning on Ray (completion-only NLL)."""
    from rayalign.config import SFTConfig
    from rayalign.drivers.offline import train

    return train(_config(SFTConfig, config, overrides))


def train_reward(config, overrides=None) -> dict:
    """Bradley–Terry reward-model training on Ray."""
    from rayalign.config import RewardConfig
    from rayalign.drivers.offline import train

    return train(_config(RewardConfig, config, overrides))


def train_online_dpo(config, overrides=None, on_step=None) -> dict:
    """Online DPO on Ray: rollout actors sample, rewards or a judge rank, learners train.
    `on_step(record)` is called after every step with a `rayalign.drivers.runner.StepRecord`."""
    from rayalign.config import OnlineDPOConfig
    from rayalign.drivers.online import train_online

    return train_online(_config(OnlineDPOConfig, config, overrides), on_step=on_step)


def evaluate_dpo(config, overrides=None) -> dict:
    """TRL's `DPOTrainer.evaluate()` without training: the eval_* metrics (eval_loss,
    eval_rewards/*, eval_logps/*, eval_logits/*, eval_runtime, ...) of model_name_or_path on
    eval_dataset (else the training rows); also written to `<output_dir>/eval_results.json`.
    `config`: DPOConfig, a dict, or a YAML path."""
    from rayalign.config import DPOConfig
    from rayalign.drivers.offline_eval import evaluate as evaluate_offline

    return evaluate_offline(_config(DPOConfig, config, overrides))


def evaluate_reward(config, overrides=None) -> dict:
    """TRL's `RewardTrainer.evaluate()` without training (eval_loss, eval_accuracy,
    eval_margin, eval_*_reward, ...); as `evaluate_dpo`, with a RewardConfig."""
    from rayalign.config import RewardConfig
    from rayalign.drivers.offline_eval import evaluate as evaluate_offline

    return evaluate_offline(_config(RewardConfig, config, overrides))


def evaluate(config, overrides=None) -> dict:
    """Eval job on Ray: sample from each model or checkpoint, score with a checker, a reward
    model and/or a pairwise judge; returns the summary written to `<output_dir>/summary.json`."""
    from rayalign.config import EvalConfig
    from rayalign.drivers.evaluate import run_eval

    return run_eval(_config(EvalConfig, config, overrides))
