"""load_best_model_at_end / metric_for_best_model / greater_is_better / save_strategy "best"
with transformers' meaning: the config's defaults and schedule checks (TrainingArguments'),
and the run skeleton tracking the best evaluation (trainer_state.json's best_metric,
best_global_step, best_model_checkpoint), keeping the best checkpoint from save_total_limit,
publishing it into output_dir and carrying it across a resume. The learner is a real Ray actor
whose weights are one number (the step it is at), so the published model names its step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rayalign import checkpoint as ckpt
from rayalign.actors.group import ActorGroup, GroupSpec
from rayalign.config import ConfigError, SFTConfig, from_dict
from rayalign.drivers import runner

REQUIRED = {"model_name_or_path": "m", "train_dataset": "d.jsonl", "eval_dataset": "e.jsonl"}


def cfg_of(**over) -> SFTConfig:
    return from_dict(SFTConfig, {**REQUIRED, **over})


# ----------------------------------------------------------------------------- config


def test_defaults_are_transformers():
    cfg = cfg_of(load_best_model_at_end=True, eval_steps=10, save_steps=20)
    assert (cfg.metric_for_best_model, cfg.greater_is_better) == ("loss", False)
    assert cfg_of(metric_for_best_model="accuracy").greater_is_better is True
    assert cfg_of(metric_for_best_model="eval_loss").greater_is_better is False
    assert cfg_of(metric_for_best_model="eval_reward", greater_is_better=False).greater_is_better is False
    plain = cfg_of()
    assert (plain.metric_for_best_model, plain.greater_is_better, plain.load_best_model_at_end) == (None, None, False)


@pytest.mark.parametrize("over, field, text", [
    ({"eval_steps": 3, "save_steps": 4}, "load_best_model_at_end", "multiple of eval_steps"),
    ({"eval_steps": 0.1, "save_steps": 500}, "load_best_model_at_end", "multiple of eval_steps"),
    ({"eval_steps": 2, "save_steps": None}, "load_best_model_at_end", "multiple of eval_steps"),
    ({"eval_strategy": "epoch", "save_steps": 4}, "load_best_model_at_end", "schedules to match"),
    ({"save_steps": 4}, "load_best_model_at_end", "only at the end"),  # eval_strategy null, no eval_steps
    ({"eval_steps": 2, "save_steps": 4, "eval_dataset": None}, "load_best_model_at_end", "needs evaluations"),
])
def test_load_best_model_at_end_needs_matching_schedules(over, field, text):
    with pytest.raises(ConfigError) as err:
        cfg_of(load_best_model_at_end=True, **over)
    assert any(line.startswith(f"{field}:") and text in line for line in str(err.value).splitlines()), err.value


def test_matching_schedules_are_accepted():
    for over in ({"eval_steps": 2, "save_steps": 4}, {"eval_steps": 0.1, "save_steps": 0.2},
                 {"eval_strategy": "epoch", "save_strategy": "epoch"}, {"save_strategy": "best", "eval_steps": 3},
                 {"eval_strategy": None, "save_strategy": "no"}):
        cfg_of(load_best_model_at_end=True, **over)


def test_ratio_schedules_are_checked_once_resolved():
    """0.1 and 0.2 of 15 steps are 2 and 3 steps (transformers' ceil): saves would miss evaluations."""
    cfg = cfg_of(load_best_model_at_end=True, eval_steps=0.1, save_steps=0.2)
    cfg.check_best_schedule(20, 10)
    with pytest.raises(ConfigError, match="^save_steps: .*every 3 steps.*every 2"):
        cfg.check_best_schedule(15, 10)


def test_save_strategy_best():
    cfg = cfg_of(save_strategy="best", metric_for_best_model="accuracy", eval_steps=2)
    assert cfg.every("save", 100, 10) is None  # saved on improvement, not on a schedule
    with pytest.raises(ConfigError, match="^save_strategy: .*metric_for_best_model"):
        cfg_of(save_strategy="best", eval_steps=2)
    with pytest.raises(ConfigError, match="^save_strategy: .*needs evaluations"):
        cfg_of(save_strategy="best", metric_for_best_model="loss", eval_strategy="no")


# ----------------------------------------------------------------------------- runs


class Counter:
    """A learner whose weights are one number: each step adds one."""

    def __init__(self, cfg, *, rank: int, world_size: int):
        self.value = 0

    def step(self) -> dict:
        self.value += 1
        return {"loss": 1.0 / self.value}

    def save(self, staging_dir: str, **_) -> None:
        os.makedirs(os.path.join(staging_dir, "learner_state"), exist_ok=True)
        Path(staging_dir, "config.json").write_text(json.dumps({"value": self.value}))
        Path(staging_dir, "learner_state", "shared.json").write_text("{}")

    def load(self, checkpoint_dir: str) -> None:
        self.value = json.loads(Path(checkpoint_dir, "config.json").read_text())["value"]


class ScriptedEvalJob(runner.Job):
    """Evaluation returns `evals[step]` (metric name -> value) at each evaluated step."""

    name = "scripted"
    plot_keys = ["loss"]

    def __init__(self, cfg, evals: dict[int, dict]):
        super().__init__(cfg, total_steps=cfg.max_steps, steps_per_epoch=4, samples_per_step=2)
        self.evals = evals
        self.learners = None

    def start(self) -> ActorGroup:
        self.learners = ActorGroup(Counter, GroupSpec("learner", 1, 0.5), args=(self.cfg,))
        return self.learners

    def step(self, step: int) -> runner.StepResult:
        return runner.StepResult(self.learners.call("step")[0])

    @property
    def has_eval(self) -> bool:
        return True

    def evaluate(self, step: int) -> dict:
        return dict(self.evals[step])

    def stop(self) -> None:
        if self.learners is not None:
            self.learners.shutdown()


def run_cfg(out: Path, **over) -> SFTConfig:
    return from_dict(SFTConfig, {**REQUIRED, "model_name_or_path": str(out.parent / "no-model"), "output_dir": str(out),
                                 "max_steps": 8, "logging_steps": 2, "eval_steps": 2, "save_steps": 2,
                                 "logging": {"progress_bar": False, "report_to": []}, **over})


def published_step(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["value"]


def checkpoints(out: Path) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(str(out))]


LOSSES = {2: {"eval_loss": 0.5}, 4: {"eval_loss": 0.2}, 6: {"eval_loss": 0.4}, 8: {"eval_loss": 0.3}}


@pytest.mark.slow
def test_best_checkpoint_is_kept_recorded_and_published(ray_local, tmp_path):
    from transformers import TrainerState

    out = tmp_path / "out"
    cfg = run_cfg(out, load_best_model_at_end=True, save_total_limit=2)
    result = runner.run(ScriptedEvalJob(cfg, LOSSES))
    best = f"{out}/checkpoint-4"
    # rotate_checkpoints: the newest and the best survive the limit
    assert checkpoints(out) == [4, 8]
    state = TrainerState.load_from_json(str(out / "trainer_state.json"))
    assert (state.best_metric, state.best_global_step, state.best_model_checkpoint) == (0.2, 4, best)
    for step in (4, 8):  # each checkpoint records the best as of its save (checkpoint-4: itself)
        saved = TrainerState.load_from_json(str(out / f"checkpoint-{step}" / "trainer_state.json"))
        assert (saved.best_metric, saved.best_model_checkpoint) == (0.2, best)
    assert published_step(out) == 4  # output_dir holds the best model, not the last
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_loss"] == 0.2 and result["metrics"]["eval_loss"] == 0.2
    assert result["model_dir"] == str(out) and result["checkpoint"] == f"{out}/checkpoint-8"


@pytest.mark.slow
def test_resume_carries_the_best_metric_and_checkpoint(ray_local, tmp_path):
    """6 steps, then resumed to 8: step 8's eval_loss (0.3) does not beat step 4's (0.2), which
    the resumed run only knows from checkpoint-6's trainer_state.json."""
    out = tmp_path / "out"
    runner.run(ScriptedEvalJob(run_cfg(out, max_steps=6, load_best_model_at_end=True, save_total_limit=2), LOSSES))
    assert checkpoints(out) == [4, 6] and published_step(out) == 4
    runner.run(ScriptedEvalJob(run_cfg(out, load_best_model_at_end=True, save_total_limit=2,
                                       resume_from_checkpoint="latest"), LOSSES))
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["global_step"], state["best_metric"], state["best_model_checkpoint"]) == (8, 0.2,
                                                                                          f"{out}/checkpoint-4")
    assert checkpoints(out) == [4, 8] and published_step(out) == 4


@pytest.mark.slow
def test_save_strategy_best_saves_on_improvement_and_a_limit_of_one_keeps_only_the_best(ray_local, tmp_path):
    out = tmp_path / "out"
    accuracy = {2: {"eval_accuracy": 0.5}, 4: {"eval_accuracy": 0.4}, 6: {"eval_accuracy": 0.7},
                8: {"eval_accuracy": 0.6}}
    cfg = run_cfg(out, save_strategy="best", metric_for_best_model="accuracy", load_best_model_at_end=True,
                  save_total_limit=1, save_steps=None)
    assert cfg.greater_is_better
    result = runner.run(ScriptedEvalJob(cfg, accuracy))
    evaluated = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if "eval_accuracy" in json.loads(line)]
    assert evaluated == [2, 4, 6, 8]
    # saved at 2 and 6 (improvements) and 8 (the end); the limit of 1 leaves the best alone
    assert checkpoints(out) == [6] and result["checkpoint"] == f"{out}/checkpoint-6"
    assert published_step(out) == 6
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["best_metric"], state["best_global_step"]) == (0.7, 6)


@pytest.mark.slow
def test_tracking_without_load_best_publishes_the_last_and_an_unknown_metric_is_named(ray_local, tmp_path):
    out = tmp_path / "out"
    runner.run(ScriptedEvalJob(run_cfg(out, metric_for_best_model="loss"), LOSSES))
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["best_metric"], state["best_model_checkpoint"]) == (0.2, f"{out}/checkpoint-4")
    assert published_step(out) == 8
    with pytest.raises(ConfigError, match="metric_for_best_model: 'eval_bleu' is not among .*eval_loss"):
        runner.run(ScriptedEvalJob(run_cfg(tmp_path / "bleu", metric_for_best_model="bleu"), LOSSES))
