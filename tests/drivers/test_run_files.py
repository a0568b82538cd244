"""The files a TRL script leaves in output_dir (`trainer.train()`, `save_state()`,
`save_metrics("train" / "eval")`), written by every rayalign training run: trainer_state.json
in transformers' TrainerState layout (also in each checkpoint-N, and what resume reads),
train_results.json, eval_results.json, all_results.json; and `rayalign eval-dpo` on the
trained output_dir reproducing the run's final eval."""

import json
import shutil
from pathlib import Path

import pytest

import rayalign
from rayalign import checkpoint as ckpt
from rayalign import cli, rundir
from rayalign.config import DPOConfig, from_dict
from tests.helpers import write_head

pytestmark = pytest.mark.slow

TRAIN_KEYS = {"train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch"}
TIMING = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def config(tiny_model_dir, data: Path, out: Path, **over) -> dict:
    return {"model_name_or_path": tiny_model_dir, "train_dataset": str(data / "train.jsonl"),
            "eval_dataset": str(data / "eval.jsonl"), "output_dir": str(out), "max_steps": 4,
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 2e-3,
            "lr_scheduler_type": "constant", "logging_steps": 2, "eval_steps": 2, "save_steps": 2,
            "max_length": 64, "seed": 3, "gradient_checkpointing": False, "logging": {"progress_bar": False},
            "learner": {"num_actors": 1, "num_cpus_per_actor": 1},
            "reference": {"mode": "actor", "num_cpus_per_actor": 1}, **over}


@pytest.fixture(scope="module")
def run(ray_local, tiny_model_dir, demo_data_dir, tmp_path_factory):
    """4 DPO steps (64 rows, 8 per step: 0.5 epoch), logged, evaluated (20 rows) and saved every 2."""
    root = tmp_path_factory.mktemp("run-files")
    write_head(Path(demo_data_dir, "pref_train.jsonl"), root / "train.jsonl", 64)
    write_head(Path(demo_data_dir, "pref_eval.jsonl"), root / "eval.jsonl", 20)
    out = root / "run"
    return root, out, rayalign.train_dpo(config(tiny_model_dir, root, out))


def test_trainer_state_loads_in_transformers_with_the_runs_log_history(run):
    from transformers import TrainerState

    _, out, result = run
    state = TrainerState.load_from_json(str(out / "trainer_state.json"))
    assert (state.global_step, state.max_steps, state.epoch) == (4, 4, 0.5)
    assert (state.logging_steps, state.eval_steps, state.save_steps, state.train_batch_size) == (2, 2, 2, 8)
    assert state.num_train_epochs == 1 and state.stateful_callbacks["TrainerControl"]["args"]["should_training_stop"]
    train = [h for h in state.log_history if "loss" in h]
    evals = [h for h in state.log_history if "eval_loss" in h]
    assert [(h["step"], h["epoch"]) for h in train] == [(2, 0.25), (4, 0.5)]
    assert [(h["step"], h["epoch"]) for h in evals] == [(2, 0.25), (4, 0.5)]
    for key in ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/accuracies", "logps/chosen",
                "logits/chosen"):
        assert key in train[-1], key
    assert TIMING <= set(evals[-1]) and "eval_rewards/margins" in evals[-1]
    summary = state.log_history[-1]
    assert set(summary) == TRAIN_KEYS | {"total_flos", "step"} and summary["step"] == 4
    # each logged loss averages the 2 steps since the last line
    assert summary["train_loss"] == pytest.approx((train[0]["loss"] + train[1]["loss"]) / 2)
    assert state.log_history == result["history"]
    # each checkpoint holds the state it was saved at (no train summary yet)
    for step in (2, 4):
        saved = TrainerState.load_from_json(str(out / f"checkpoint-{step}" / "trainer_state.json"))
        assert saved.global_step == step
        assert saved.log_history == [h for h in state.log_history[:-1] if h["step"] <= step]


def test_results_files_are_what_save_metrics_writes(run):
    _, out, result = run
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert set(train) == TRAIN_KEYS and train["epoch"] == 0.5
    assert train["train_runtime"] == result["metrics"]["train_runtime"]
    final_eval = {k: v for k, v in json.loads((out / "trainer_state.json").read_text())["log_history"][-2].items()
                  if k != "step"}
    assert evaluation == final_eval and evaluation["epoch"] == 0.5
    assert evaluation["eval_loss"] == result["metrics"]["eval_loss"]
    assert json.loads((out / "all_results.json").read_text()) == {**train, **evaluation}
    assert {"trainer_state.json", "train_results.json", "eval_results.json", "all_results.json"} <= \
        set(rundir.run_entries(str(out)))


def test_resume_reads_the_transformers_layout(run, tiny_model_dir, tmp_path):
    root, out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    rayalign.train_dpo(config(tiny_model_dir, root, resumed, resume_from_checkpoint="latest"))
    want = json.loads((out / "trainer_state.json").read_text())["log_history"]
    got = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in got] == [h["step"] for h in want]
    assert got[:2] == want[:2]  # carried over from checkpoint-2
    assert got[2]["loss"] == pytest.approx(want[2]["loss"], rel=1e-4)  # step 4, trained again


def test_checkpoints_of_older_versions_still_resume(tmp_path):
    """trainer_state.json as rayalign wrote it before ({"step": ...}): resume reads its step."""
    out = tmp_path / "old"
    staged = tmp_path / ".staging"
    (staged / "learner_state").mkdir(parents=True)
    (staged / "learner_state" / "shared.json").write_text("{}")
    (staged / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0.5, "log_history": []}))
    ckpt.commit_checkpoint(str(staged), str(out), "checkpoint-3", step=3)
    assert ckpt.load_trainer_state(str(out / "checkpoint-3"))["step"] == 3
    cfg = from_dict(DPOConfig, {"model_name_or_path": "m", "train_dataset": "d.jsonl", "output_dir": str(out),
                                "resume_from_checkpoint": "latest"})
    assert rundir.check_resume(cfg, total_steps=10) == (str(out / "checkpoint-3"), 3)


def test_eval_dpo_on_the_trained_output_dir_reproduces_the_runs_final_eval(run, tmp_path):
    """model_name_or_path: the run's output_dir. The reference is the run's (its
    rayalign_config.yaml), and the epoch the run's: eval_results.json as the run wrote it."""
    root, out, _ = run
    target = tmp_path / "eval"
    assert cli.main(["eval-dpo", "--model_name_or_path", str(out), "--train_dataset", str(root / "train.jsonl"),
                     "--eval_dataset", str(root / "eval.jsonl"), "--output_dir", str(target),
                     "--per_device_eval_batch_size", "8", "--max_length", "64", "--learner.num_actors", "1",
                     "--learner.num_cpus_per_actor", "1", "--reference.num_cpus_per_actor", "1"]) == 0
    got = json.loads((target / "eval_results.json").read_text())
    want = json.loads((out / "eval_results.json").read_text())
    assert set(got) == set(want)
    # eval_num_tokens is the evaluating trainer's count of training tokens (TRL's too): 0 here
    for key in set(want) - TIMING - {"eval_num_tokens"}:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
