"""Metrics JSONL + TensorBoard, resume truncation, plots, optional backends."""

import importlib.util
import json

import pytest

from rayalign.tracking import MetricsLogger, ProgressReporter, average_metrics, plot_metrics


def test_jsonl_tensorboard_resume_and_plots(tmp_path):
    log = MetricsLogger(str(tmp_path))
    for step in (1, 2, 3):
        log.log({"loss": 1.0 / step, "rewards/margins": 0.1 * step}, step)
    log.log({"eval_loss": 0.4}, 3)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 3] and lines[0]["loss"] == 1.0
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    resumed = MetricsLogger(str(tmp_path))
    resumed.truncate_after(2)
    resumed.log({"loss": 0.3}, 3)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    paths = plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path), ["loss", "rewards/margins", "absent"])
    assert paths and (tmp_path / "metrics.png").stat().st_size > 1000


def test_tables_and_averaging(tmp_path):
    log = MetricsLogger(str(tmp_path), report_to=())
    path = log.log_table("generations", [{"prompt": "p", "completion": "c"}], step=5)
    assert json.loads(open(path).readline()) == {"step": 5, "prompt": "p", "completion": "c"}
    assert average_metrics([{"a": 1, "b": 2}, {"a": 3}]) == {"a": 2.0, "b": 2.0}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="wandb"):
        MetricsLogger(str(tmp_path), report_to=("wandb",))


def test_progress_lines(capsys):
    p = ProgressReporter(4, every_s=0.0, desc="test")
    p.update(4, {"loss": 0.5}, samples=32)
    err = capsys.readouterr().err
    assert "step 4/4" in err and "samples/s" in err and "loss 0.5" in err
