"""The GPU check: what a lent GPU machine measures in one short run (issue 18), and its CPU dry run.

    bash benchmarks/gpu/run.sh              # on a GPU machine: <= 8 min on one H200, no network
    bash benchmarks/gpu/run.sh --dry-run    # CPU, tiny shapes, the same code path (CI runs it)

It prints what it found (GPU, driver, torch / CUDA / vLLM / DeepSpeed / transformers), fails with
a clear message where a wheel is missing, builds a config-initialised Qwen2.5-0.5B-shaped model
(bf16; a locally trained tokenizer; nothing is downloaded), then measures, each part guarded so a
failure is recorded and the rest still runs:

* matmul peak (bf16 on GPU, fp32 on CPU), measured here, and the published dense bf16 peak;
* the DPO step in-process (rayalign's objective, AdamW): tokens/s and MFU against both peaks;
* the reference pass (no-grad log-probs, what the precompute stage runs): tokens/s;
* rollout generation through rayalign's vLLM engine: generated tokens/s;
* a rayalign DPO job (Ray, DeepSpeed learner, reference precompute): samples/s end to end;
* a 20-step online DPO job on one GPU (learner and vLLM engine colocated on it): step time and
  the weight push learner -> engine per step, for each channel the GPU count allows (nccl
  needs two GPUs and is reported as skipped with its reason);
* the `gpu`-marked tests.

One JSON summary goes to stdout (last line) and to <out>/gpu_check.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), and a tiny one for the dry run
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=2048, tie_word_embeddings=True),
}
# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s
DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
WHEELS = ("torch", "transformers", "deepspeed", "ray", "vllm", "peft")


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def environment(dry_run: bool) -> dict:
    """What this machine has; a missing wheel (or no GPU outside the dry run) stops here."""
    found, missing = {"python": platform.python_version()}, []
    for name in WHEELS:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - any import failure means the wheel is unusable
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    import torch

    found["cuda"] = torch.version.cuda
    found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        found["nvidia_smi"] = q.stdout.strip().splitlines()
    log("found: " + json.dumps(found))
    if missing:
        sys.exit("gpu-check: missing or broken wheels: " + "; ".join(missing) +
                 " (install them into the interpreter run.sh uses: PY=/path/to/python)")
    if not dry_run and not found["gpus"]:
        sys.exit("gpu-check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
                 "use --dry-run for the CPU check")
    return found


def dense_peak_tflops(gpu_name: str) -> float | None:
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in gpu_name), None)


def build_model(out: Path, shape: str, dtype) -> Path:
    """A Qwen2-architecture model with `shape`'s dimensions, config-initialised, and a BPE
    tokenizer trained here on synthetic text (its vocabulary is smaller than the embedding's,
    as Qwen's own 151643 < 151936)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rayalign.models.tiny import build_tokenizer
    from scale import TextGen

    gen = TextGen(0)
    tokenizer = build_tokenizer([gen.words_about(60) for _ in range(2000)] + ["\n\nHuman: ", "\n\nAssistant: "] * 100,
                                vocab_size=min(8192, SHAPES[shape]["vocab_size"]))
    dims = SHAPES[shape]
    config = Qwen2Config(**dims, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    path = out / f"model-{shape}"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def matmul_peak_tflops(device: str, dtype, n: int, reps: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def synthetic_rows(tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0) -> list[dict]:
    """Tokenized preference rows with a length spread (half to full length)."""
    import random

    rng, vocab = random.Random(seed), len(tokenizer)
    rows = []
    for _ in range(n):
        p = rng.randint(prompt_tokens // 2, prompt_tokens)
        c, r = (rng.randint(completion_tokens // 2, completion_tokens) for _ in range(2))
        rows.append({"prompt_ids": [rng.randrange(4, vocab) for _ in range(p)],
                     "chosen_ids": [rng.randrange(4, vocab) for _ in range(c)] + [tokenizer.eos_token_id],
                     "rejected_ids": [rng.randrange(4, vocab) for _ in range(r)] + [tokenizer.eos_token_id]})
    return rows


def train_flops(model, tokens: int, seq_sq_sum: int) -> float:
    """Useful training FLOPs: 6 x (parameters in matmuls) per token, plus causal attention
    (QK^T and AV: 6 x layers x hidden x L^2 for forward+backward over a sequence of L tokens,
    halved for causality... counted as 6 * layers * hidden * sum(L^2) here, the PaLM convention)."""
    cfg = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if cfg.tie_word_embeddings:  # the head reuses the embedding matrix: its matmul still counts
        matmul_params += model.get_input_embeddings().weight.numel()
    return 6 * matmul_params * tokens + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq_sq_sum


def dpo_step(model_dir: Path, device: str, dtype, pairs: int, prompt_tokens: int, completion_tokens: int,
             steps: int, peak: float, dense_peak: float | None) -> dict:
    """The DPO step in-process: rayalign's dpo_objective forward + backward + AdamW step."""
    import torch

    from rayalign.batch import PreferenceBatch
    from rayalign.config import DPOConfig
    from rayalign.models.loading import load_causal_lm, load_tokenizer
    from rayalign.objectives import dpo_objective, reference_logprobs

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), bf16=dtype == torch.bfloat16).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = DPOConfig(model_name_or_path=str(model_dir), train_dataset="-", bf16=dtype == torch.bfloat16,
                    max_length=prompt_tokens + completion_tokens + 1)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    rows = synthetic_rows(tok, pairs * (steps + 2), prompt_tokens, completion_tokens)
    batches = []
    for i in range(steps + 2):
        batch = PreferenceBatch.from_rows(rows[i * pairs:(i + 1) * pairs], tok.pad_token_id, cfg.max_length)
        batches.append(batch.to(device))
    model.eval()
    t = time.perf_counter()
    for i, batch in enumerate(batches):
        batches[i] = batch.with_reference(*reference_logprobs(model, batch, cfg))
    _sync(device)
    ref_s = time.perf_counter() - t
    model.train()
    times = []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss, _ = dpo_objective(model, batch, cfg)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    lengths = batches[2].attention_mask.sum(dim=1).tolist()
    tokens = sum(lengths)
    flops = train_flops(model, tokens, sum(n * n for n in lengths))
    step_s = sorted(times)[len(times) // 2]
    all_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    out = {"pairs_per_step": pairs, "tokens_per_step": tokens, "step_s_median": step_s,
           "tokens_per_s": tokens / step_s, "achieved_tflops": flops / step_s / 1e12,
           "mfu_vs_measured_matmul": flops / step_s / 1e12 / peak,
           "reference_tokens_per_s": all_tokens / ref_s}
    if dense_peak:
        out["mfu_vs_dense_bf16_peak"] = flops / step_s / 1e12 / dense_peak
    return out


def vllm_rollout(model_dir: Path, gpu: bool, prompts: int, new_tokens: int) -> dict:
    """Generated tokens/s through rayalign's rollout class on its vLLM engine (in-process: the
    code a rollout actor runs, without the actor)."""
    from rayalign.actors.rollout import Rollout, actor_env
    from rayalign.config import RolloutConfig

    rcfg = RolloutConfig(backend="vllm", gpu_memory_utilization=0.35 if gpu else 0.2, enforce_eager=not gpu,
                         num_gpus_per_actor=1.0 if gpu else 0.0, dtype="bfloat16" if gpu else "auto")
    os.environ.update(actor_env(rcfg))
    rollout = Rollout(str(model_dir), rcfg, "vllm", max_model_len=1024, bf16=gpu)
    vocab = len(rollout.tokenizer)
    ids = [[(7 * i + j) % (vocab - 4) + 4 for j in range(64)] for i in range(prompts)]
    sampling = {"n": 1, "max_new_tokens": new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None,
                "repetition_penalty": 1.0, "generation_kwargs": {"ignore_eos": True}}
    rollout.generate(ids[:4], {**sampling, "max_new_tokens": 4}, seed=0)  # warm-up
    t = time.perf_counter()
    out = rollout.generate(ids, sampling, seed=0)
    seconds = time.perf_counter() - t
    generated = sum(len(c["token_ids"]) for per_prompt in out.completions for c in per_prompt)
    return {"prompts": prompts, "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def write_data(out: Path, n_pairs: int, n_prompts: int) -> tuple[Path, Path]:
    from scale import write_data as scale_data

    return scale_data(out / "data", n_pairs=n_pairs, n_prompts=n_prompts)


def dpo_job(model_dir: Path, data: Path, out: Path, gpu: bool, steps: int) -> dict:
    import rayalign

    cfg = {"model_name_or_path": str(model_dir), "train_dataset": str(data), "output_dir": str(out / "dpo-job"),
           "overwrite_output_dir": True, "max_steps": steps, "per_device_train_batch_size": 8 if gpu else 2,
           "learning_rate": 1e-6, "max_length": 1024 if gpu else 128, "bf16": gpu, "logging_steps": 5,
           "save_strategy": "no", "logging": {"report_to": [], "progress_bar": False},
           "learner": {"num_gpus_per_actor": 1.0 if gpu else 0.0},
           "reference": {"mode": "precompute", "num_gpus_per_actor": 0.0,
                         "cache_dir": str(out / "ref-cache")}}
    if gpu:  # the reference stage shares the learner's GPU here: both fit on one H200
        cfg["learner"]["num_gpus_per_actor"] = 0.5
        cfg["reference"]["num_gpus_per_actor"] = 0.5
    result = rayalign.train_dpo(cfg)
    m = result["metrics"]
    return {"steps": steps, "train_samples_per_second": m.get("train_samples_per_second"),
            "train_runtime_s": m.get("train_runtime"), "reference_cache": result.get("reference_cache")}


def online_job(model_dir: Path, out: Path, gpu: bool, steps: int, weight_sync: str) -> dict:
    """Online DPO on one GPU: learner and vLLM engine colocated (half a GPU each), on the demo
    task's prompts and rule reward (speed, not learning: the model is untrained)."""
    import rayalign
    from rayalign.demo.task import write_demo_data

    prompts = write_demo_data(out / "demo-data", seed=0, n_sft=8, n_pref=8) / "prompts_train.jsonl"
    share = 0.5 if gpu else 0.0
    cfg = {"model_name_or_path": str(model_dir), "train_dataset": str(prompts),
           "output_dir": str(out / f"online-{weight_sync}"), "overwrite_output_dir": True, "max_steps": steps,
           "per_device_train_batch_size": 8 if gpu else 2, "learning_rate": 5e-7, "max_new_tokens": 64 if gpu else 8,
           "max_length": 512 if gpu else 96, "bf16": gpu, "logging_steps": 5, "save_strategy": "no",
           "reward_funcs": ["rayalign.demo.task:demo_reward"], "logging": {"report_to": [], "progress_bar": False},
           "learner": {"num_gpus_per_actor": share},
           "rollout": {"backend": "vllm", "num_gpus_per_actor": share, "weight_sync": weight_sync,
                       "gpu_memory_utilization": 0.3 if gpu else 0.2, "enforce_eager": not gpu,
                       "dtype": "bfloat16" if gpu else "auto", "probe_tolerance": 5e-2 if gpu else 1e-3}}
    result = rayalign.train_online_dpo(cfg)
    pushes = [json.loads(line) for line in open(Path(cfg["output_dir"]) / "weight_sync.jsonl")]
    push_s = sorted(p["seconds"] for p in pushes[1:] or pushes)
    records = [json.loads(line) for line in open(Path(cfg["output_dir"]) / "metrics.jsonl")]
    steps_logged = [r for r in records if "timing/train_s" in r]
    last = steps_logged[-1] if steps_logged else {}
    return {"steps": steps, "weight_sync": weight_sync, "pushes": len(pushes),
            "weight_push_s_median": push_s[len(push_s) // 2], "weight_push_s_max": push_s[-1],
            "train_runtime_s": result["metrics"].get("train_runtime"),
            "timing_last": {k: v for k, v in last.items() if k.startswith("timing/")}}


def gpu_tests(dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = proc.stdout.strip().splitlines()[-12:]
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, short runs (CI)")
    ap.add_argument("--out", default="outputs/gpu-check")
    ap.add_argument("--shapes", default=None, help="comma list of 0.5b,1.5b (default 0.5b; tiny with --dry-run)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: step,rollout,dpo_job,online,tests")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    found = environment(a.dry_run)
    import torch

    gpu = not a.dry_run
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    summary: dict = {"machine": found, "dry_run": a.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    skip = set(filter(None, a.skip.split(",")))
    gpu_name = found["gpus"][0] if found["gpus"] else platform.processor() or "cpu"
    summary["dense_bf16_peak_tflops"] = dense_peak_tflops(gpu_name) if gpu else None
    summary["matmul_peak_tflops"] = matmul_peak_tflops(device, dtype, 8192 if gpu else 512, 50 if gpu else 10)
    log(f"matmul peak {summary['matmul_peak_tflops']:.2f} TFLOP/s ({dtype})")

    def part(name: str, fn):
        if any(name == s or name.startswith(s + "_") for s in skip):
            summary[name] = {"skipped": "--skip"}
            return
        t = time.perf_counter()
        log(f"{name} ...")
        try:
            summary[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
            summary[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        summary[name + "_wall_s"] = round(time.perf_counter() - t, 1)
        log(f"{name}: {json.dumps(summary[name], default=str)[:400]}")

    shapes = (a.shapes or ("tiny" if a.dry_run else "0.5b")).split(",")
    pref, _ = write_data(out, n_pairs=400 if gpu else 24, n_prompts=16)
    for shape in shapes:
        model_dir = build_model(out, shape, dtype)
        pre = "" if shape == shapes[0] else f"{shape}/"
        part(pre + "dpo_step", lambda: dpo_step(model_dir, device, dtype, pairs=8 if gpu else 2,
                                                 prompt_tokens=512 if gpu else 32, completion_tokens=512 if gpu else 32,
                                                 steps=8 if gpu else 2, peak=summary["matmul_peak_tflops"],
                                                 dense_peak=summary["dense_bf16_peak_tflops"]))
        if shape != shapes[0]:
            continue
        part("rollout", lambda: vllm_rollout(model_dir, gpu, prompts=256 if gpu else 4, new_tokens=128 if gpu else 8))
        part("dpo_job", lambda: dpo_job(model_dir, pref, out, gpu, steps=20 if gpu else 2))
        channels = ["object_store"] + (["cuda_ipc"] if gpu and _has_channel("cuda_ipc") else [])
        for channel in channels:
            part(f"online_{channel}", lambda: online_job(model_dir, out, gpu, 20 if gpu else 2, channel))
        summary["online_nccl"] = {"skipped": "nccl needs the learner and each engine on GPUs of their own "
                                  f"({torch.cuda.device_count()} GPU(s) here)"} if torch.cuda.device_count() < 2 else \
            {"skipped": "not run by this one-GPU check"}
    part("tests", lambda: gpu_tests(a.dry_run))
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, default=str))
    errors = [k for k, v in summary.items() if isinstance(v, dict) and "error" in v]
    return 1 if errors else 0


def _has_channel(name: str) -> bool:
    from rayalign.weight_sync import CHANNELS

    return name in CHANNELS


if __name__ == "__main__":
    sys.exit(main())
