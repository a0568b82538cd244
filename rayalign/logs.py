"""What a command prints: rayalign's own lines (progress, evaluations, the final summary) on the
console, library output (vLLM, DeepSpeed, transformers, Ray, Python warnings) in a log file.

`rayalign <command> --verbose` prints everything as the libraries do. Otherwise the libraries
are turned down through their own switches (environment variables the Ray actors inherit),
the actors' output is not streamed to the console (Ray keeps it in its session logs, whose
path is logged once), and what the driver's libraries still log goes to
`~/.cache/rayalign/logs/<command>-<time>-<pid>.log` (RAYALIGN_LOG_DIR), which a training run
copies into `<output_dir>/logs/` when it ends: the output dir belongs to the run only once
its first step succeeded, so nothing is written there before.
"""

from __future__ import annotations

import logging
import os
import time

# Read by the libraries themselves, in this process and in the Ray actors it starts.
LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_CONFIGURE_LOGGING": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
}
LIBRARY_LOGGERS = ("ray", "transformers", "deepspeed", "DeepSpeed", "vllm", "datasets", "torch", "urllib3",
                   "filelock", "httpx", "huggingface_hub", "accelerate", "peft", "py.warnings", "tensorboardX")
QUIET_ENV = "RAYALIGN_QUIET"  # "1": ensure_ray does not stream the actors' output to the console


def quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


class Setup:
    """The logging one command runs under; `restore()` puts back what it changed (main() may
    be called in-process, from a notebook or a test)."""

    def __init__(self, command: str, verbose: bool):
        self.log_file: str | None = None
        self._env = {k: os.environ.get(k) for k in (*LIBRARY_ENV, QUIET_ENV)}
        self._loggers = {n: (lg.handlers, lg.propagate, lg.level)
                         for n, lg in ((n, logging.getLogger(n)) for n in LIBRARY_LOGGERS)}
        self._capture = logging.getLogger("py.warnings").handlers
        if not verbose:
            self.log_file = _quiet(command)

    def restore(self) -> None:
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name, (handlers, propagate, level) in self._loggers.items():
            lib = logging.getLogger(name)
            for handler in lib.handlers:
                if handler not in handlers:
                    handler.close()
            lib.handlers, lib.propagate, lib.level = handlers, propagate, level
        logging.captureWarnings(False)


def configure(command: str, verbose: bool) -> Setup:
    """Set up this process's logging for `command` (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Setup(command, verbose)


def _quiet(command: str) -> str:
    for key, value in LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    os.environ[QUIET_ENV] = "1"
    root = os.environ.get("RAYALIGN_LOG_DIR", os.path.expanduser("~/.cache/rayalign/logs"))
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)  # the driver's warnings go to the file too (py.warnings)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers = [handler]
        lib.propagate = False
        lib.setLevel(logging.INFO)
    logging.getLogger("rayalign").info("library logs: %s (--verbose prints them here)", path)
    return path


def keep(log_file: str | None, output_dir: str) -> None:
    """Copy the library log into `<output_dir>/logs/` (a finished run owns its dir)."""
    from rayalign import storage

    if not log_file or not os.path.exists(log_file) or not storage.exists(output_dir):
        return
    storage.makedirs(storage.join(output_dir, "logs"))
    storage.copy_file(log_file, storage.join(output_dir, "logs", os.path.basename(log_file)))
