"""The run skeleton on its own: a new kind of job supplies only `start` and `step` (plus an
optional `evaluate`), and gets logging, evaluation and checkpoint cadence, the final save,
throughput and the Tune report from `runner.run`. The learner here is a real Ray actor
whose whole state is one number, so every file the runner writes can be checked exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rayalign import checkpoint as ckpt
from rayalign.actors.group import ActorGroup, GroupSpec
from rayalign.config import SFTConfig, from_dict
from rayalign.drivers import runner

pytestmark = pytest.mark.slow


class Counter:
    """A learner whose weights are one number: each step adds one; loss = 1 / value."""

    def __init__(self, cfg, *, rank: int, world_size: int):
        self.value = 0

    def step(self) -> dict:
        self.value += 1
        return {"loss": 1.0 / self.value}

    def save(self, staging_dir: str) -> None:
        os.makedirs(staging_dir, exist_ok=True)
        Path(staging_dir, "config.json").write_text(json.dumps({"value": self.value}))

    def load(self, checkpoint_dir: str) -> None:
        self.value = json.loads(Path(checkpoint_dir, "config.json").read_text())["value"]


class CountingJob(runner.Job):
    name = "count"
    plot_keys = ["loss"]

    def __init__(self, cfg):
        super().__init__(cfg, total_steps=cfg.max_steps, steps_per_epoch=4, samples_per_step=2)
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
        return {"eval_loss": 1.0 / (step + 1)}

    def stop(self) -> None:
        if self.learners is not None:
            self.learners.shutdown()


def test_a_job_gets_the_runs_cadence_saves_and_results_from_the_skeleton(ray_local, tmp_path):
    cfg = from_dict(SFTConfig, {"model_name_or_path": str(tmp_path / "no-model"), "train_dataset": "unused.jsonl",
                                "output_dir": str(tmp_path / "out"), "max_steps": 8, "logging_steps": 2,
                                "eval_steps": 3, "save_steps": 4, "logging": {"progress_bar": False, "report_to": []}})
    reports: list[dict] = []
    records: list[runner.StepRecord] = []
    result = runner.run(CountingJob(cfg), report=reports.append, on_step=records.append)

    lines = [json.loads(x) for x in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
    train = [(x["step"], x["loss"], x["epoch"]) for x in lines if "loss" in x]
    # each line averages the steps since the last one: (1/1 + 1/2) / 2, (1/3 + 1/4) / 2, ...
    assert train == [(2, 0.75, 0.5), (4, (1 / 3 + 1 / 4) / 2, 1.0), (6, (1 / 5 + 1 / 6) / 2, 1.5),
                     (8, (1 / 7 + 1 / 8) / 2, 2.0)]
    assert [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x] == [(3, 1 / 4), (6, 1 / 7), (8, 1 / 9)]
    assert [r.step for r in records] == list(range(8))
    assert all(r.finished >= r.started for r in records)
    # save_steps=4: checkpoint-4 mid-run and the final checkpoint-8, each with its trainer state
    for step in (4, 8):
        path = Path(cfg.output_dir, f"checkpoint-{step}")
        assert json.loads((path / "config.json").read_text()) == {"value": step}
        assert ckpt.load_trainer_state(str(path))["step"] == step
    assert json.loads(Path(cfg.output_dir, "config.json").read_text()) == {"value": 8}  # published
    assert result["checkpoint"] == f"{cfg.output_dir}/checkpoint-8" and result["total_steps"] == 8
    assert result["metrics"]["loss"] == train[-1][1] and result["metrics"]["eval_loss"] == 1 / 9
    assert result["metrics"]["train_samples_per_second"] > 0
    # Tune: after each evaluation before the end, then once with the final results
    assert [r["step"] for r in reports] == [3, 6, 8] and reports[-1]["checkpoint"] == result["checkpoint"]
    assert Path(cfg.output_dir, "metrics.png").is_file()
