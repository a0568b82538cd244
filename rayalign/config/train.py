"""The training jobs' configs: fields every job shares (TrainingArguments names), SFT,
DPO (loss fields from the loss table) and reward models."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from rayalign.config.base import (ConfigError, LearnerConfig, LoggingConfig, LoraConfig, RayConfig, ReferenceConfig,
                                  _expand_paths, _one_of, _require, is_adapter_dir, report)
from rayalign.losses import LOSSES, LossParams, loss_type_errors


SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Fields every training job shares (TRL / TrainingArguments names)."""

    model_name_or_path: str = ""  # a local dir or a hub id, loaded with from_pretrained
    tokenizer_name_or_path: str | None = None  # default: model_name_or_path
    # TRL's name: keyword arguments of every from_pretrained of the policy and reference
    # (dtype, attn_implementation, revision, ...); TRL ModelConfig's dtype /
    # attn_implementation / model_revision land here.
    model_init_kwargs: dict | None = None
    # JSONL / JSON / CSV / Parquet / save_to_disk dir ("path:split" for a DatasetDict), or any
    # name datasets.load_dataset takes (a local dataset dir, a hub id).
    train_dataset: str = ""
    eval_dataset: str | None = None
    # TRL ScriptArguments: a dataset for load_dataset(dataset_name, dataset_config) instead of
    # train_dataset / eval_dataset; its dataset_train_split trains, its dataset_test_split
    # evaluates when eval_strategy is not "no" (TRL's scripts' rule).
    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    # rayalign extra (datasets' rename_columns): {dataset column: the name rayalign reads}, for
    # data whose columns are not TRL's (prompt / chosen / rejected / completion / messages / margin)
    column_mapping: dict | None = None
    output_dir: str = "outputs/run"
    # TRL's name. A dir holding another run is refused unless this is set (the old run's
    # checkpoints and logs are removed once the new run's first step succeeded) or the job
    # resumes it with resume_from_checkpoint.
    overwrite_output_dir: bool = False
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | float = 0  # a float < 1 is a ratio of the training steps (transformers)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    # TRL's default (null): true where the learners have GPUs (learner.num_gpus_per_actor > 0),
    # false on CPU, where TRL would run bf16 autocast but rayalign trains fp32.
    bf16: bool | None = None
    gradient_checkpointing: bool = True
    disable_dropout: bool = True
    # "steps" | "epoch" | "no", as TrainingArguments. *_steps: an integer, or a float < 1 for
    # a ratio of the training steps. The final step is always logged, evaluated (with eval
    # data, unless eval_strategy is "no") and saved.
    logging_strategy: str = "steps"
    logging_steps: int | float = 10
    # null (rayalign's default): every eval_steps when set, else once at the end; TRL's
    # default "no" evaluates never (TRL's scripts then call trainer.evaluate()).
    eval_strategy: str | None = None
    eval_steps: int | float | None = None  # eval_strategy "steps": default logging_steps
    # "steps" | "epoch" | "no" | "best" (transformers: save whenever metric_for_best_model
    # improves at an evaluation; needs metric_for_best_model). The final checkpoint is always saved.
    save_strategy: str = "steps"
    save_steps: int | float | None = 500  # null: only the final checkpoint
    # transformers' meaning: the newest checkpoints beyond this are deleted, never the best one
    # (best_model_checkpoint); with 1 and a best checkpoint, only the best is left at the end.
    save_total_limit: int | None = None
    # transformers' name: checkpoints hold the model files only (no optimizer, scheduler, RNG
    # state): smaller, but they cannot be resumed (resume_from_checkpoint refuses them, and
    # after an actor failure the run restarts from step 0).
    save_only_model: bool = False
    # rayalign extra: save_pretrained's max_shard_size ("500MB", "5GB", ...) for full-model
    # checkpoints; null: transformers' default (50GB). Sharded saves publish and load whole.
    save_max_shard_size: str | None = None
    # transformers' names. Track metric_for_best_model ("loss" = eval_loss; with or without the
    # "eval_" prefix) over the evaluations; best_metric / best_model_checkpoint go into
    # trainer_state.json. load_best_model_at_end: output_dir gets the best checkpoint's model
    # (and eval_results.json its metrics) instead of the last one; needs eval data and the save
    # schedule to match the eval schedule (save_strategy == eval_strategy, save_steps a multiple
    # of eval_steps) unless save_strategy is "best". metric_for_best_model defaults to "loss"
    # when load_best_model_at_end; greater_is_better defaults to false for names ending in
    # "loss", true otherwise.
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    # transformers' names. push_to_hub: upload output_dir's model (its model files, README.md
    # model card, trainer_state.json and *_results.json) to the Hugging Face Hub repo
    # hub_model_id (default: output_dir's basename in the token's namespace), created if missing
    # (private: hub_private_repo; null: the namespace's default). hub_strategy "end": once, at the
    # end; "every_save" (transformers' default): also after every checkpoint save (the
    # checkpoint's model is published into output_dir first), in the background; a push that
    # finds the previous one still running is skipped unless hub_always_push. hub_revision: the
    # branch to commit to; hub_token: null uses `hf auth login`'s token (never written to files).
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool | None = None
    hub_revision: str | None = None
    hub_strategy: str = "every_save"
    hub_token: str | None = field(default=None, repr=False)
    hub_always_push: bool = False
    # rayalign extra: on the first SIGINT/SIGTERM of the CLI the step loop finishes its step,
    # saves checkpoint-N and exits 130/143 (a second signal stops at once, without saving).
    save_on_interrupt: bool = False
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    max_length: int | None = 1024
    max_prompt_length: int | None = None  # rayalign extra (TRL 0.x): truncate the prompt first
    max_completion_length: int | None = None  # rayalign extra: truncate completions first
    truncation_mode: str = "keep_start"  # TRL 1.16 default
    drop_bad_rows: bool = False  # True: drop and count malformed rows instead of failing
    # TRL's: how many processes tokenize the data; here the most Ray tasks tokenizing pieces at once
    # (None: as many as the cluster has CPUs)
    dataset_num_proc: int | None = None
    # TRL's DataLoader knobs, for Ray Data's per-learner iterator: batches fetched ahead of the
    # step (None: Ray Data's default, 1), and pinned host memory for GPU learners' copies
    dataloader_prefetch_factor: int | None = None
    dataloader_pin_memory: bool = True
    trust_remote_code: bool = False
    # TRL's name. Pack a micro-batch's sequences into shared rows (restarting position ids, no
    # row longer than the longest sequence) instead of padding them. None (the default): packed
    # wherever it gives the padded numbers — checked once per model at its first forward
    # (rayalign.models.logprobs.packing_supported); true: always; false: never. Reward models
    # pack too (score_packing_supported), reading each sequence's score where transformers'
    # padded forward reads it.
    padding_free: bool | None = None
    # Actor deaths survived per run: groups are recreated and the run restored from the last
    # complete checkpoint (or restarted from step 0 before the first one). 0: fail at once.
    max_failures: int = 3
    ray: RayConfig = field(default_factory=RayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _expand_paths(self, ("model_name_or_path", "tokenizer_name_or_path", "train_dataset", "eval_dataset",
                             "output_dir", "resume_from_checkpoint"))
        if self.bf16 is None:
            object.__setattr__(self, "bf16", self.learner.num_gpus_per_actor > 0)
        _require(bool(self.model_name_or_path), "model_name_or_path", "is required")
        self._check_datasets()
        self._check_schedule()
        _require(bool(self.output_dir), "output_dir", "is required")
        _require(self.max_steps > 0 or self.num_train_epochs > 0, "max_steps",
                 "set max_steps > 0 or num_train_epochs > 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
                 "must be >= 1 or null")
        self._check_best_model()
        self._check_hub()
        _require(0 <= self.learning_rate < float("inf"), "learning_rate", f"must be >= 0 and finite, got "
                 f"{self.learning_rate}")
        _require(self.max_failures >= 0, "max_failures", "must be >= 0")
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (numpy and torch seeds), got {self.seed}")
        _require(self.num_train_epochs >= 0, "num_train_epochs", f"must be >= 0, got {self.num_train_epochs}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.adam_epsilon >= 0, "adam_epsilon", f"must be >= 0, got {self.adam_epsilon}")
        _one_of(self.lr_scheduler_type, "lr_scheduler_type", SCHEDULERS)
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.warmup_steps >= 0 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()),
                 "warmup_steps", f"must be an integer >= 0 or a ratio in [0, 1), got {self.warmup_steps}")
        if self.model_init_kwargs is not None:
            for key in ("quantization_config", "load_in_4bit", "load_in_8bit", "device_map"):
                _require(key not in self.model_init_kwargs, f"model_init_kwargs.{key}",
                         "not supported: quantized loading has no CPU kernels, and Ray places the models")
            dtype = self.model_init_kwargs.get("dtype", self.model_init_kwargs.get("torch_dtype"))
            _one_of(dtype, "model_init_kwargs.dtype", [None, "auto", "float32", "bfloat16"])
            _require(dtype != "bfloat16" or self.bf16, "model_init_kwargs.dtype",
                     "bfloat16 weights need bf16=true (DeepSpeed then keeps fp32 master weights)")
        _require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        _one_of(self.truncation_mode, "truncation_mode", ["keep_end", "keep_start"])
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "must be >= 1 or null")
        if self.lora.enabled and self.learner.zero_stage == 3:
            raise ConfigError("lora.enabled: LoRA with learner.zero_stage=3 is not supported; use stage 0-2")

    def _check_datasets(self) -> None:
        for name in ("dataset_num_proc", "dataloader_prefetch_factor"):
            _require(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1 or null")
        for old, new in (self.column_mapping or {}).items():
            _one_of(new, f"column_mapping.{old}", ["prompt", "chosen", "rejected", "completion", "messages",
                                                   "margin"])
        if self.dataset_name is None:
            _require(bool(self.train_dataset), "train_dataset", "is required (or TRL's dataset_name)")
            for name in ("dataset_config",):
                _require(getattr(self, name) is None, name, "needs dataset_name")
            return
        _require(not self.train_dataset, "dataset_name", f"conflicts with train_dataset={self.train_dataset}: "
                 "give one of them")
        _require(bool(self.dataset_train_split), "dataset_train_split", "must name a split")

    def _check_schedule(self) -> None:
        _one_of(self.logging_strategy, "logging_strategy", ["steps", "epoch", "no"])
        _one_of(self.eval_strategy, "eval_strategy", [None, "steps", "epoch", "no"])
        _one_of(self.save_strategy, "save_strategy", ["steps", "epoch", "no", "best"])
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            _require(value is None or value >= 1 and float(value).is_integer() or 0 < value < 1, name,
                     f"must be an integer >= 1, a ratio in (0, 1) of the training steps, or null; got {value}")
        _require(self.logging_steps is not None, "logging_steps", "must be set (use logging_strategy=no)")
        if self.eval_strategy not in (None, "no"):
            _require(self.eval_source is not None, "eval_strategy",
                     f"{self.eval_strategy} needs evaluation data: set eval_dataset (or dataset_name with a "
                     "dataset_test_split)")

    def _check_best_model(self) -> None:
        """transformers' defaults and checks of load_best_model_at_end / metric_for_best_model /
        greater_is_better / save_strategy "best" (TrainingArguments.__post_init__)."""
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            object.__setattr__(self, "metric_for_best_model", "loss")
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            object.__setattr__(self, "greater_is_better", not self.metric_for_best_model.endswith("loss"))
        _require(self.metric_for_best_model != "", "metric_for_best_model", "must name an eval metric or be null")
        if self.save_strategy == "best":
            _require(self.metric_for_best_model is not None, "save_strategy",
                     "\"best\" saves when metric_for_best_model improves: set metric_for_best_model "
                     "(or load_best_model_at_end=true, which defaults it to \"loss\")")
        if self.metric_for_best_model is not None and (self.load_best_model_at_end or self.save_strategy == "best"):
            _require(self.eval_source is not None and self.eval_strategy != "no",
                     "load_best_model_at_end" if self.load_best_model_at_end else "save_strategy",
                     "needs evaluations: set eval_dataset (or dataset_name with a dataset_test_split) and an "
                     "eval_strategy other than \"no\"")
        if not self.load_best_model_at_end or self.save_strategy == "best":
            return
        evals = self.eval_strategy or ("steps" if self.eval_steps is not None else "no")
        if evals != self.save_strategy:
            report(f"load_best_model_at_end: needs the save and eval schedules to match (or save_strategy=best), "
                   f"got save_strategy={self.save_strategy!r} and eval_strategy={self.eval_strategy!r}"
                   + (" (null without eval_steps: only at the end)" if self.eval_strategy is None else ""))
        elif evals == "steps":
            eval_steps = self.eval_steps if self.eval_steps is not None else self.logging_steps
            save, ev = self.save_steps, eval_steps
            # transformers' test; ratios compare in millionths (float remainders are not exact)
            if save is None or save % ev != 0 and ((save < 1) != (ev < 1) or
                                                   round(save * 1_000_000) % round(ev * 1_000_000) != 0):
                report(f"load_best_model_at_end: needs save_steps to be a multiple of eval_steps, got "
                       f"save_steps={save} and eval_steps={ev}")

    def check_best_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """load_best_model_at_end: every save step must be an evaluation step once ratios are
        resolved into steps (`every`); ConfigError otherwise (checked before Ray starts)."""
        if not self.load_best_model_at_end or self.save_strategy == "best":
            return
        save, ev = (self.every(kind, total_steps, steps_per_epoch) for kind in ("save", "eval"))
        if save and ev and save % ev:
            raise ConfigError(f"save_steps: load_best_model_at_end needs every save to follow an evaluation; "
                              f"over {total_steps} steps save_steps={self.save_steps} saves every {save} steps "
                              f"and eval_steps={self.eval_steps} evaluates every {ev}")

    def _check_hub(self) -> None:
        _one_of(self.hub_strategy, "hub_strategy", ["end", "every_save"])
        _require(self.hub_model_id is None or bool(self.hub_model_id.strip("/")), "hub_model_id",
                 "must name a repo (\"name\" or \"namespace/name\") or be null")
        _require(not (self.save_only_model and self.save_on_interrupt), "save_on_interrupt",
                 "its checkpoint is for resuming, which save_only_model=true checkpoints cannot")
        _require(self.save_max_shard_size is None or
                 re.fullmatch(r"\d+([KMG]i?B|[kmg]b)", str(self.save_max_shard_size), re.IGNORECASE) is not None,
                 "save_max_shard_size", f"must be an integer with a unit (\"500MB\", \"5GB\", \"1GiB\") or null, "
                 f"got {self.save_max_shard_size!r}")

    @property
    def hub_repo_name(self) -> str:
        """The repo push_to_hub creates: hub_model_id, else output_dir's basename (transformers)."""
        return self.hub_model_id or self.output_dir.rstrip("/").rsplit("/", 1)[-1]

    def every(self, kind: str, total_steps: int, steps_per_epoch: int) -> int | None:
        """How often (in steps) to log / evaluate / save, from `<kind>_strategy` and
        `<kind>_steps` as TrainingArguments reads them; None: only at the end (or never)."""
        strategy = getattr(self, f"{kind}_strategy")
        steps = getattr(self, f"{kind}_steps")
        if kind == "eval":
            if strategy is None:
                strategy = "steps" if steps is not None else "no"
            elif strategy == "steps" and steps is None:
                steps = self.logging_steps
        if strategy in ("no", "best") or steps is None and strategy == "steps":
            return None  # "best": saved when the metric improves, not on a schedule
        if strategy == "epoch":
            return max(1, steps_per_epoch)
        return max(1, math.ceil(steps * total_steps)) if steps < 1 else int(steps)

    def warmup(self, total_steps: int) -> int:
        """Warmup steps: warmup_steps (a float < 1 is a ratio), else warmup_ratio."""
        if 0 < self.warmup_steps < 1:
            return math.ceil(self.warmup_steps * total_steps)
        return int(self.warmup_steps) or math.ceil(self.warmup_ratio * total_steps)

    @property
    def train_source(self):
        """Where the training rows come from (`rayalign.data.DataSource`)."""
        from rayalign.data import DataSource

        if self.dataset_name is not None:
            return DataSource(self.dataset_name, self.dataset_config, self.dataset_train_split, self._columns)
        return DataSource(self.train_dataset, columns=self._columns)

    @property
    def eval_source(self):
        """Evaluation rows (`rayalign.data.DataSource`), or None."""
        from rayalign.data import DataSource

        if self.eval_dataset:
            return DataSource(self.eval_dataset, columns=self._columns)
        if self.dataset_name is not None and self.eval_strategy not in (None, "no") and self.dataset_test_split:
            return DataSource(self.dataset_name, self.dataset_config, self.dataset_test_split, self._columns)
        return None

    @property
    def _columns(self) -> tuple[tuple[str, str], ...]:
        return tuple((self.column_mapping or {}).items())

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_name_or_path or self.model_name_or_path

    @property
    def tokenizer_field(self) -> str:
        """The config field `tokenizer_path` comes from, for error messages."""
        return "tokenizer_name_or_path" if self.tokenizer_name_or_path else "model_name_or_path"

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.learner.num_actors


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: NLL on completion tokens."""

    learning_rate: float = 2e-5


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Offline DPO. Loss fields follow TRL 1.16's DPOConfig (see docs/losses.md)."""

    # beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau are
    # `losses.LossParams`'s fields; their defaults (TRL's) live there only, and
    # `LossParams.of(cfg)` hands them to the losses.
    beta: float = LossParams.beta
    loss_type: tuple[str, ...] = ("sigmoid",)  # names in losses.LOSSES
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = LossParams.label_smoothing
    f_divergence_type: str = LossParams.f_divergence_type
    f_alpha_divergence_coef: float = LossParams.f_alpha_divergence_coef
    discopop_tau: float = LossParams.discopop_tau
    use_weighting: bool = False  # WPO
    ld_alpha: float | None = None  # LD-DPO
    reference_free: bool = False
    precompute_ref_log_probs: bool = False  # TRL name; same as reference.mode=precompute
    sync_ref_model: bool = False  # TR-DPO
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    generate_during_eval: bool = False
    num_generate_prompts: int = 4
    max_new_tokens: int = 16
    # PEFT policies (lora.enabled; model_name_or_path may be an adapter dir to continue).
    # The trained adapter's name inside the learner (TRL name); the checkpoint holds only it.
    model_adapter_name: str = "default"
    # TRL name. Set: the reference is a frozen copy of the starting adapter, loaded a second
    # time under this name, and the learner switches to it for reference log-probs (the
    # effective reference mode `adapter`). Needs a LoRA policy; reference.mode stays actor.
    ref_adapter_name: str | None = None
    # TRL name. A LoRA policy takes its reference from its own weights (reference.mode
    # implicit, or ref_adapter_name); reference.mode actor / precompute load a separate
    # model and, as in TRL, must be asked for with force_use_ref_model=true (ConfigError
    # otherwise). reference.model_name_or_path may be an adapter dir (loaded merged).
    force_use_ref_model: bool = False
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self):
        super().__post_init__()
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(len(self.loss_type) >= 1, "loss_type", "must name at least one loss")
        for i, name in enumerate(self.loss_type):
            _one_of(name, f"loss_type[{i}]" if len(self.loss_type) > 1 else "loss_type", LOSSES)
        if self.loss_weights is not None:
            _require(len(self.loss_weights) == len(self.loss_type), "loss_weights",
                     f"needs one weight per loss_type ({len(self.loss_type)}), got {len(self.loss_weights)}")
        _require(0.0 <= self.label_smoothing <= 0.5, "label_smoothing",
                 f"must be in [0, 0.5], got {self.label_smoothing}")
        # Per-loss bounds, f-divergence and WPO support: the loss table's metadata.
        errors = loss_type_errors(self.loss_type, LossParams.of(self), weighted=self.use_weighting)
        if errors:
            raise ConfigError(errors[0])
        if self.ld_alpha is not None:
            _require(0.0 <= self.ld_alpha <= 1.0, "ld_alpha", "must be in [0, 1] or null")
        _require(0.0 <= self.ref_model_mixup_alpha <= 1.0, "ref_model_mixup_alpha", "must be in [0, 1]")
        _require(self.ref_model_sync_steps >= 1, "ref_model_sync_steps", "must be >= 1")
        _require(self.discopop_tau > 0, "discopop_tau", f"must be > 0, got {self.discopop_tau}")
        _require(self.num_generate_prompts >= 1, "num_generate_prompts", "must be >= 1")
        _require(not self.generate_during_eval or self.eval_source is not None, "generate_during_eval",
                 "needs evaluation data (eval_dataset, or dataset_name with eval_strategy set): its prompts "
                 "are the eval set's")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        mode = self.reference_mode
        if mode == "implicit":
            _require(self.lora.enabled, "reference.mode", "implicit needs lora.enabled=true")
        if self.sync_ref_model:
            _require(mode == "actor", "sync_ref_model",
                     f"TR-DPO needs reference.mode=actor (got {mode}): precomputed or implicit "
                     "references cannot be updated")
            _require(not self.lora.enabled, "sync_ref_model",
                     "TR-DPO mixes full policy weights into the reference; not supported with a LoRA policy")
        if self.precompute_ref_log_probs:
            _require(self.reference.mode in (None, "actor", "precompute"), "precompute_ref_log_probs",
                     f"conflicts with reference.mode={self.reference.mode}")
        self._check_peft(mode)

    def _check_peft(self, mode: str) -> None:
        """The PEFT reference options: adapter dirs, two adapters, force_use_ref_model."""
        if is_adapter_dir(self.model_name_or_path):
            _require(self.lora.enabled, "lora.enabled",
                     f"model_name_or_path={self.model_name_or_path} is a PEFT adapter dir (adapter_config.json); "
                     "set lora.enabled=true to continue training that adapter")
        if self.lora.enabled:
            import torch

            for name in ("model_adapter_name", "ref_adapter_name"):
                value = getattr(self, name)
                _require(value is None or (value.isidentifier() and not hasattr(torch.nn.Module, value)),
                         name, f"{value!r} is not usable as a PEFT adapter name (an identifier that is not "
                         "a torch.nn.Module attribute such as 'train')")
        if self.ref_adapter_name is not None:
            _require(self.lora.enabled, "ref_adapter_name",
                     "a reference adapter needs a LoRA policy (lora.enabled=true, optionally with an adapter "
                     "dir as model_name_or_path)")
            _require(self.ref_adapter_name != self.model_adapter_name, "ref_adapter_name",
                     f"must differ from model_adapter_name ({self.model_adapter_name!r})")
            _require(not self.force_use_ref_model, "ref_adapter_name",
                     "conflicts with force_use_ref_model=true (a separate reference model); set one of them")
            conflict = ("reference_free" if self.reference_free else
                        "precompute_ref_log_probs" if self.precompute_ref_log_probs else
                        f"reference.mode={self.reference.mode}" if self.reference.mode not in (None, "actor")
                        else None)
            _require(conflict is None, "ref_adapter_name",
                     f"selects the adapter reference; conflicts with {conflict}")
        if self.force_use_ref_model:
            _require(mode in ("actor", "precompute"), "force_use_ref_model",
                     f"asks for a separate reference model; conflicts with reference mode {mode}")
        if self.lora.enabled and mode in ("actor", "precompute") and not self.force_use_ref_model:
            name = "precompute_ref_log_probs" if self.precompute_ref_log_probs else "reference.mode"
            raise ConfigError(
                f"{name}: reference mode {mode} loads a separate reference model, but the policy is a LoRA "
                "adapter: use reference.mode=implicit (adapter disabled), ref_adapter_name (a frozen copy of "
                "the starting adapter), or set force_use_ref_model=true to load "
                f"{self.reference.model_name_or_path or self.model_name_or_path} as the reference anyway")

    @property
    def reference_mode(self) -> str:
        """The effective mode: reference_free, precompute_ref_log_probs and ref_adapter_name
        map onto it."""
        if self.reference_free:
            return "none"
        if self.precompute_ref_log_probs:
            return "precompute"
        if self.ref_adapter_name is not None:
            return "adapter"
        if self.reference.mode is None:  # TRL: a PEFT policy without a ref model disables its adapter
            return "implicit" if self.lora.enabled and not self.force_use_ref_model else "actor"
        return self.reference.mode


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    """Bradley–Terry reward-model training (TRL RewardConfig names)."""

    learning_rate: float = 1e-4
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.center_rewards_coefficient is not None:
            _require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")
