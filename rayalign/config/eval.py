"""The eval job's config (`rayalign eval`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rayalign.config.base import LoggingConfig, RayConfig, _expand_paths, _require
from rayalign.config.sampling import JudgeConfig, RolloutConfig, SamplingConfig, ScoringConfig


EVAL_MODEL_KEYS = ("path", "name", "x")


@dataclass(frozen=True)
class EvalConfig(SamplingConfig):
    """`rayalign eval`: sample completions for an eval prompt set from one or more models
    (rollout actors, the online-DPO sampling fields) and score them with any of: a
    programmatic `checker`, a reward model (mean score), and a pairwise `judge` against a
    `baseline` (win rate with a 95% interval; positions swapped on exactly half the pairs).

    `models` entries: a model dir; `name=path`; a run dir holding `checkpoint-<step>` dirs
    (each complete checkpoint, ordered by step, x = step); or a mapping {path, name, x}
    where `x` places the model on the plot's x axis (a step, a parameter count, ...).
    """

    models: tuple[str | dict, ...] = ()
    eval_dataset: str = ""  # prompt rows; `completion` or `chosen` column: reference completions
    output_dir: str = "outputs/eval"
    limit: int | None = None  # only the first `limit` prompts
    num_samples: int = 1  # completions per prompt and model (> 1 needs temperature > 0)
    # The judge's other side: "reference" (the dataset's completions), a model path (its
    # completions are sampled like the models'), or null (no judge).
    baseline: str | None = None
    judge: JudgeConfig | None = None
    reward_model_path: str | None = None  # TRL's name: a reward model whose mean score is reported
    checker: str | None = None  # module:function(prompts, completions, **columns) -> bools or floats
    temperature: float = 0.0  # greedy: an eval is repeatable (SamplingConfig's other fields as they are)
    max_length: int | None = 1024  # prompt + completion tokens the reward model / judge reads
    seed: int = 42  # sampling seeds and which half of the pairs the judge sees swapped
    bf16: bool = False
    trust_remote_code: bool = False
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)  # the reward_model_path actor
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _require(len(self.models) >= 1, "models", "needs at least one model path, name=path or run dir")
        for i, entry in enumerate(self.models):
            name = f"models[{i}]"
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - set(EVAL_MODEL_KEYS))
                _require(not unknown, name, f"unknown keys {unknown}; allowed: {', '.join(EVAL_MODEL_KEYS)}")
                _require(isinstance(entry.get("path"), str) and bool(entry["path"].strip()), f"{name}.path",
                         "is required (a model dir or a run dir)")
                x = entry.get("x")
                _require(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)), f"{name}.x",
                         f"must be a number or null, got {x!r}")
            else:
                _require(bool(entry.strip()) and not entry.strip().endswith("="), name, "must not be empty")
        _expand_paths(self, ("eval_dataset", "output_dir", "reward_model_path", "baseline"))
        _require(bool(self.eval_dataset), "eval_dataset", "is required")
        _require(bool(self.output_dir), "output_dir", "is required")
        if self.limit is not None:
            _require(self.limit >= 1, "limit", "must be >= 1 or null")
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        if self.num_samples > 1:
            _require(self.temperature > 0, "num_samples",
                     "> 1 needs temperature > 0 (greedy samples would all be the same)")
        self.check_sampling()
        if self.max_length is not None:
            _require(self.max_length >= 1, "max_length", "must be >= 1 or null")
        if self.baseline is not None:
            _require(bool(self.baseline.strip()), "baseline", "must be 'reference', a model path or null")
            _require(self.judge is not None, "baseline", "is only read by a judge: set judge or drop baseline")
        if self.judge is not None:
            _require(self.baseline is not None, "judge", "needs a baseline to compare with: 'reference' "
                     "(the dataset's completions) or a model path")
        if self.checker is not None:
            spec = self.checker
            _require(":" in spec and all(spec.partition(":")[::2]), "checker", f"{spec!r} is not module:function")
        if self.reward_model_path is not None:
            _require(bool(self.reward_model_path.strip()), "reward_model_path", "must not be empty")
        _require(self.judge is not None or self.checker is not None or self.reward_model_path is not None,
                 "checker", "an eval needs a score: set checker, reward_model_path or judge (with baseline)")
        if self.rollout.max_model_len is not None:
            _require(self.rollout.max_model_len >= self.max_new_tokens, "rollout.max_model_len",
                     "must be >= max_new_tokens")
