"""Online DPO's config (TRL 1.16 OnlineDPOConfig names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rayalign.config.base import ConfigError, ReferenceConfig, _one_of, _require
from rayalign.config.sampling import JudgeConfig, RolloutConfig, SamplingConfig, ScoringConfig
from rayalign.config.train import TrainConfig


@dataclass(frozen=True)
class OnlineDPOConfig(TrainConfig, SamplingConfig):
    """Online DPO (OAIF), TRL 1.16 OnlineDPOConfig names: each step the policy samples two
    completions per prompt, a reward (models and/or functions) or a judge picks chosen and
    rejected, and the policy takes a DPO step on the pair.

    `train_dataset` holds prompts (standard `{"prompt": str}` or conversational message
    lists). `per_device_train_batch_size` counts prompts (= pairs) per learner micro-batch.
    `beta` is one value or a list with one value per epoch (the last one kept after).
    `reward_funcs` entries are `module:function` (called with prompts, completions,
    completion_ids and the dataset's other columns, returning one float per completion) or
    reward-model paths; `reward_model_path` (TRL's name) adds one more model.
    """

    learning_rate: float = 5e-7
    max_length: int | None = 512
    truncation_mode: str = "keep_end"  # prompt start dropped first, like TRL's online trainer
    temperature: float = 0.9  # SamplingConfig's other fields as they are
    missing_eos_penalty: float | None = None
    beta: tuple[float, ...] = (0.1,)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    reward_funcs: tuple[str, ...] = ()
    reward_model_path: str | None = None
    reward_weights: tuple[float, ...] | None = None
    # A NaN / inf score (or a completion every reward function returns None for) is never a
    # tie: "error" fails the step naming the reward source; "penalize" ranks that completion
    # 1 below the step's lowest finite score (a reward-model judge: it loses its pair).
    nonfinite_scores: Literal["error", "penalize"] = "error"
    judge: JudgeConfig | None = None
    log_completions: bool = True  # a table of prompts, both completions and scores
    log_completions_steps: int | None = None  # default: logging_steps
    num_completions_to_log: int = 4
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self):
        super().__post_init__()
        _require(len(self.beta) >= 1, "beta", "needs at least one value")
        for i, b in enumerate(self.beta):
            _require(b > 0, f"beta[{i}]" if len(self.beta) > 1 else "beta", f"must be > 0, got {b}")
        _one_of(self.loss_type, "loss_type", ["sigmoid", "ipo"])
        self.check_sampling()
        gen = self.generation_kwargs or {}
        greedy = ("temperature=0" if self.temperature == 0 or gen.get("temperature") == 0 else
                  "top_k=1" if self.top_k == 1 or gen.get("top_k") == 1 else
                  "generation_kwargs.do_sample=false" if gen.get("do_sample") is False else None)
        _require(greedy is None, "temperature", f"online DPO samples two completions per prompt; with {greedy} "
                 "sampling is greedy, the two are identical and make no preference pair (use temperature > 0)")
        _one_of(self.nonfinite_scores, "nonfinite_scores", ["error", "penalize"])
        # TrainConfig's extras that online DPO has no use for: refused rather than ignored
        _require(self.max_prompt_length is None, "max_prompt_length",
                 "not used by online DPO (TRL's OnlineDPOConfig has no such field): prompts are cut from the "
                 "start to fit max_length together with max_new_tokens; set max_length")
        _require(self.max_completion_length is None, "max_completion_length",
                 "not used by online DPO: completions are max_new_tokens long at most; set max_new_tokens")
        if self.missing_eos_penalty is not None:
            _require(self.missing_eos_penalty >= 0, "missing_eos_penalty", "must be >= 0 or null")
        for i, spec in enumerate(self.reward_funcs):
            _require(bool(spec.strip()), f"reward_funcs[{i}]", "must not be empty")
        n_rewards = len(self.reward_sources)
        if self.judge is not None and n_rewards:
            raise ConfigError("judge: give either a judge or reward_funcs/reward_model_path, not both "
                              f"(got judge.type={self.judge.type} and {n_rewards} reward source(s))")
        if self.judge is not None and self.missing_eos_penalty is not None:
            raise ConfigError("missing_eos_penalty: it is subtracted from reward scores; a judge gives none "
                              "(unset it, or rank with reward_funcs / reward_model_path)")
        if self.judge is None and not n_rewards:
            raise ConfigError("reward_funcs: online DPO needs a way to rank samples: set reward_funcs "
                              "(module:function or reward-model paths), reward_model_path, or judge")
        if self.reward_weights is not None:
            _require(len(self.reward_weights) == n_rewards, "reward_weights",
                     f"needs one weight per reward source ({n_rewards}), got {len(self.reward_weights)}")
        _one_of(self.reference.mode, "reference.mode", [None, "actor", "implicit", "none"])
        if self.reference.mode == "implicit":
            _require(self.lora.enabled, "reference.mode", "implicit needs lora.enabled=true")
        if self.log_completions_steps is not None:
            _require(self.log_completions_steps >= 1, "log_completions_steps", "must be >= 1 or null")
        _require(self.num_completions_to_log >= 1, "num_completions_to_log", "must be >= 1")
        if self.rollout.max_model_len is not None and self.max_length is not None:
            _require(self.rollout.max_model_len >= self.max_new_tokens, "rollout.max_model_len",
                     "must be >= max_new_tokens")
        if self.rollout.weight_sync == "cuda_ipc":  # the engines map learner rank 0's GPU memory
            _require(0 < self.learner.num_gpus_per_actor < 1 and self.learner.num_actors == 1, "rollout.weight_sync",
                     "cuda_ipc: one learner on a fraction of the GPU its engines share (learner.num_actors=1, "
                     f"learner.num_gpus_per_actor in (0, 1); got {self.learner.num_actors} x "
                     f"{self.learner.num_gpus_per_actor})")
        if self.rollout.weight_sync == "nccl":  # learner rank 0 is the broadcast's sender, on its GPU
            _require(self.learner.num_gpus_per_actor >= 1 and float(self.learner.num_gpus_per_actor).is_integer(),
                     "rollout.weight_sync", f"nccl needs whole-GPU learners (learner.num_gpus_per_actor >= 1, got "
                     f"{self.learner.num_gpus_per_actor}); use object_store")

    @property
    def reward_sources(self) -> tuple[str, ...]:
        """Reward functions and reward-model paths, in order (reward_model_path last)."""
        return self.reward_funcs + ((self.reward_model_path,) if self.reward_model_path else ())

    @property
    def reference_mode(self) -> str:
        if self.reference.mode is None:  # TRL: a PEFT policy's reference is its adapter switched off
            return "implicit" if self.lora.enabled else "actor"
        return self.reference.mode

    @property
    def ld_alpha(self) -> None:  # the reference pass shares DPO's log-prob code
        return None

    def beta_for_epoch(self, epoch: int) -> float:
        """TRL: one beta per epoch from a list, the last one kept after the list ends."""
        return self.beta[epoch] if epoch < len(self.beta) else self.beta[-1]

    @property
    def prompts_per_step(self) -> int:
        return self.global_batch_size
