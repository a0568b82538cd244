"""Metrics, progress and plots: JSONL + TensorBoard (+ W&B / MLflow when asked).

Every logged step is one line of `<output_dir>/metrics.jsonl` (`{"step": n, ...}`), flushed
at once; a resumed run first drops lines beyond its resume step, so the file never holds a
step twice. A run ends with PNG plots of its key curves in the output dir.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable

logger = logging.getLogger("rayalign")


def average_metrics(items: Iterable[dict]) -> dict[str, float]:
    """Mean of each key over the dicts that have it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for item in items:
        for k, v in item.items():
            if v is None:
                continue
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


class MetricsLogger:
    """Writes metrics to JSONL, TensorBoard and optional W&B / MLflow."""

    def __init__(self, output_dir: str, *, report_to: Iterable[str] = ("tensorboard",),
                 run_name: str | None = None, project: str = "rayalign", config_dict: dict | None = None):
        self.output_dir = output_dir.removeprefix("file://")
        if "://" in self.output_dir:  # drivers pass storage.RunFiles(...).local_dir for URIs
            raise ValueError(f"output_dir={output_dir!r}: MetricsLogger writes to a local directory")
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = os.path.join(self.output_dir, "metrics.jsonl")
        report_to = tuple(report_to)
        self._tb = self._wandb = self._mlflow = None
        if "wandb" in report_to:
            self._wandb = _require("wandb", "logging.report_to")
            self._wandb.init(project=project, name=run_name, config=config_dict or {})
        if "mlflow" in report_to:
            self._mlflow = _require("mlflow", "logging.report_to")
            self._mlflow.start_run(run_name=run_name)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(self.output_dir, "runs"))

    def truncate_after(self, step: int) -> None:
        """Drop lines with step > `step` (a resumed run re-logs them)."""
        if not os.path.exists(self.path):
            return
        kept = [line for line in Path(self.path).read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        Path(tmp).write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in clean.items()}, step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> str:
        """A table (e.g. generated completions) as `<output_dir>/tables/<name>.jsonl`."""
        table_dir = os.path.join(self.output_dir, "tables")
        os.makedirs(table_dir, exist_ok=True)
        path = os.path.join(table_dir, f"{name}.jsonl")
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, default=str) + "\n")
        if self._tb is not None:
            text = "\n\n".join(" | ".join(f"**{k}**: {v}" for k, v in row.items()) for row in rows)
            self._tb.add_text(name, text, step)
        if self._wandb is not None:
            cols = list(rows[0]) if rows else []
            self._wandb.log({name: self._wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])},
                            step=step)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _require(module: str, field: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{field}: {module!r} is listed but not installed (pip install {module})") from None


class ProgressReporter:
    """A tqdm bar on a terminal, periodic step lines with rates otherwise."""

    def __init__(self, total_steps: int, *, enabled: bool = True, desc: str = "train", every_s: float = 10.0):
        self.total = total_steps
        self.enabled = enabled
        self.desc = desc
        self.every_s = every_s
        self.t0 = time.time()
        self._last_print = 0.0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=desc, dynamic_ncols=True)
        self._pos = 0

    def update(self, step: int, metrics: dict | None = None, samples: int | None = None) -> None:
        if not self.enabled:
            return
        metrics = metrics or {}
        if self._bar is not None:
            self._bar.update(step - self._pos)
            self._pos = step
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "rewards/accuracies", "accuracy")}
            self._bar.set_postfix(shown)
            return
        now = time.time()
        if now - self._last_print < self.every_s and step != self.total:
            return
        self._last_print = now
        elapsed = max(now - self.t0, 1e-9)
        parts = [f"{self.desc} step {step}/{self.total}", f"{step / elapsed:.2f} it/s"]
        if samples is not None:
            parts.append(f"{samples / elapsed:.1f} samples/s")
        parts += [f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "rewards/accuracies",
                                                                        "rewards/margins", "accuracy")]
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_metrics(metrics_path: str, output_dir: str, keys: list[str], filename: str = "metrics.png") -> list[str]:
    """One PNG with a subplot per key present in the JSONL file; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return []
    series: dict[str, tuple[list, list]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k in keys:
            if k in row:
                xs, ys = series.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(row[k])
    present = [k for k in keys if k in series]
    if not present:
        return []
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, k in zip(axes.flat, present):
        xs, ys = series[k]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(output_dir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
