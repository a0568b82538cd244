"""Command line: `rayalign <command> [--config FILE] [--key value ...]` (also `python -m rayalign`).

    rayalign tiny-model --output outputs/tiny-model
    rayalign demo-data --output outputs/demo-data
    rayalign sft    --config jobs/sft-tiny.yaml --max_steps 50
    rayalign dpo    --config jobs/dpo-tiny.yaml --learner.num_actors 2 --reference.mode precompute
    rayalign reward --config jobs/reward-tiny.yaml
    rayalign online-dpo --config jobs/online-dpo-tiny.yaml   # sample, score, DPO step, push weights
    rayalign demo   --output_dir outputs/demo     # tiny model -> SFT -> reward -> DPO -> online DPO -> eval
    rayalign sweep  --config jobs/sweep-dpo-tiny.yaml   # Ray Tune over a job's fields
    rayalign eval   --config jobs/eval-tiny.yaml   # checkpoints -> completions, checker, reward, judge win rate
    rayalign eval-dpo    --config jobs/dpo-tiny.yaml --model_name_or_path outputs/dpo-tiny   # TRL's evaluate()
    rayalign eval-reward --config jobs/reward-tiny.yaml --model_name_or_path outputs/reward-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from rayalign import logs
from rayalign.config import ConfigError, DPOConfig, EvalConfig, OnlineDPOConfig, RewardConfig, SFTConfig, load_config

TRAIN_COMMANDS = {"sft": SFTConfig, "dpo": DPOConfig, "reward": RewardConfig, "online-dpo": OnlineDPOConfig}
EVAL_COMMANDS = {"eval-dpo": DPOConfig, "eval-reward": RewardConfig}  # a job config's model, no training
RAY_COMMANDS = {"demo", "sweep", "eval", *TRAIN_COMMANDS, *EVAL_COMMANDS}  # SIGINT/SIGTERM stop actors, local Ray


def _train(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"rayalign {command}", add_help=True)
    parser.add_argument("--config", default=None, help="YAML job config (see jobs/)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(TRAIN_COMMANDS[command], args.config, overrides)
    if command == "online-dpo":
        from rayalign.drivers.online import train_online as train
    else:
        from rayalign.drivers.offline import train

    result = train(cfg)
    logs.keep(_setup.log_file if _setup else None, cfg.output_dir)
    print(json.dumps({"model_dir": result["model_dir"], "checkpoint": result["checkpoint"],
                      "metrics": result["metrics"]}, indent=2, default=str))
    return 0


_setup: logs.Setup | None = None  # the running command's logging (its library log file)


def main(argv: list[str] | None = None) -> int:
    """Run one command. `--verbose` anywhere prints the libraries' output (vLLM, DeepSpeed,
    transformers, Ray actors) on the console; by default it goes to a log file (rayalign.logs)."""
    global _setup
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    _setup = logs.configure(argv[0] if argv else "rayalign", verbose)
    try:
        return _main(argv)
    finally:
        _setup.restore()
        _setup = None


def _main(argv: list[str]) -> int:
    commands = ["tiny-model", "demo-data", "demo", "sweep", "eval", *TRAIN_COMMANDS, *EVAL_COMMANDS]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command not in RAY_COMMANDS:
        return _run(command, rest)
    from rayalign.actors.group import Interrupted, shutdown_ray

    if command == "sweep":  # Tune's own SIGINT handler would end the sweep early and report success
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    previous = _install_signal_handlers()
    try:
        return _run(command, rest)
    except Interrupted as exc:
        shutdown_ray()
        print(f"rayalign {command}: interrupted by {exc}; its actors and the local Ray it started are stopped",
              file=sys.stderr, flush=True)
        return 128 + exc.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    finally:
        shutdown_ray()  # no-op unless this process started a local Ray (or it is stopped already)
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored
                signal.signal(signum, handler)


def _install_signal_handlers() -> dict:
    """Make the first SIGINT/SIGTERM raise `Interrupted` in the main thread, so the drivers'
    `finally:` blocks stop their actor groups; a second one while stopping exits at once
    (the reaper of a local Ray then kills what is left of it). With save_on_interrupt the
    first one, during the step loop, asks the loop to save a checkpoint first; the second
    one then raises. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set there (e.g. main() called from a thread)
    from rayalign.actors import group

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if stopping:
            os._exit(128 + signum)
        if group.deferring_interrupts():  # save_on_interrupt: the step loop saves, then stops
            group.record_interrupt(signum)
            print(f"rayalign: {signal.Signals(signum).name}: saving a checkpoint after the current step, "
                  "then stopping (send it again to stop at once, without one)", file=sys.stderr, flush=True)
            return
        stopping = True
        raise group.Interrupted(signum)

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}


def _run(command: str, rest: list[str]) -> int:
    try:
        if command in TRAIN_COMMANDS:
            return _train(command, rest)
        parser = argparse.ArgumentParser(prog=f"rayalign {command}")
        if command == "sweep":
            parser.add_argument("--config", required=True, help="sweep YAML (see jobs/sweep-*.yaml)")
            a, overrides = parser.parse_known_args(rest)
            from rayalign.sweep import load_sweep_config, run_sweep

            summary = run_sweep(load_sweep_config(a.config, overrides))
            return 0 if summary["best"] is not None else 1
        if command == "eval":
            parser.add_argument("--config", default=None, help="eval YAML (see jobs/eval-*.yaml)")
            a, overrides = parser.parse_known_args(rest)
            from rayalign.drivers.evaluate import run_eval

            cfg = load_config(EvalConfig, a.config, overrides)
            summary = run_eval(cfg)
            keys = ("name", "checker", "reward", "win_rate")
            print(json.dumps({"output_dir": cfg.output_dir,
                              "models": [{k: m[k] for k in keys if k in m} for m in summary["models"]]},
                             indent=2, default=str))
            return 0
        if command in EVAL_COMMANDS:
            parser.add_argument("--config", default=None, help="the job's YAML (see jobs/)")
            a, overrides = parser.parse_known_args(rest)
            from rayalign.drivers.offline_eval import evaluate

            print(json.dumps(evaluate(load_config(EVAL_COMMANDS[command], a.config, overrides)), indent=2))
            return 0
        if command == "tiny-model":
            parser.add_argument("--output", required=True)
            parser.add_argument("--seed", type=int, default=0)
            parser.add_argument("--size", choices=["tiny", "small"], default="tiny",
                                help="tiny: 2 x 64 (fast, capacity-bound); small: 4 x 128, the demo's")
            a = parser.parse_args(rest)
            from rayalign.demo.task import build_demo_model

            print(build_demo_model(a.output, seed=a.seed, size=a.size))
        elif command == "demo-data":
            from rayalign.demo.task import DEMO_N_PREF, write_demo_data

            parser.add_argument("--output", required=True)
            parser.add_argument("--seed", type=int, default=0)
            parser.add_argument("--n_pref", type=int, default=DEMO_N_PREF,
                                help=f"preference pairs in pref_train*.jsonl (the demo's {DEMO_N_PREF})")
            a = parser.parse_args(rest)
            print(write_demo_data(a.output, seed=a.seed, n_pref=a.n_pref))
        elif command == "demo":
            parser.add_argument("--output_dir", default="outputs/demo")
            parser.add_argument("--sft_steps", type=int, default=None)
            parser.add_argument("--dpo_steps", type=int, default=None)
            parser.add_argument("--reward_steps", type=int, default=None)
            parser.add_argument("--num_learners", type=int, default=2)
            parser.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto",
                                help="rollout backend of the online DPO and eval stages")
            a = parser.parse_args(rest)
            from rayalign.demo.pipeline import run_demo

            run_demo(a.output_dir, sft_steps=a.sft_steps, dpo_steps=a.dpo_steps, reward_steps=a.reward_steps,
                     num_learners=a.num_learners, backend=a.backend)
        return 0
    except ConfigError as exc:
        print(f"rayalign {command}: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # DataError, ModelLoadError, CheckpointError: named input problems
        print(f"rayalign {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
