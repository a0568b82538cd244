"""The eval driver: sample completions from each model, score them, write the results.

    rayalign eval --config jobs/eval-tiny.yaml

For each model (a path, or every checkpoint of a run dir, in step order) rollout actors
(vLLM or HF, online DPO's sampling fields) sample `num_samples` completions per eval
prompt; then any of: a programmatic `checker` (pass rate), a reward model (mean score), and
a pairwise judge against the `baseline` (the dataset's reference completions or another
model's samples; win rate with a Wilson 95% interval, ties counted as half, the baseline
shown first on exactly half of the pairs). The rollout actors are started afresh for every
model: checkpoints of different sizes or tokenizers need their own engine anyway, and a
push of weights read from disk would put the model in the driver, which holds none.

Writes to `output_dir`: `completions.jsonl` (one row per prompt x model x sample: prompt,
completion, checker value, reward, judgment, score), `summary.json`, `metrics.png` (each
metric across the models) and `metrics.jsonl` / TensorBoard (one logged step per model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import ray

from rayalign import storage
from rayalign.actors.group import ActorGroup, GroupSpec, ensure_ray
from rayalign.actors.rollout import Rollout, actor_env, as_completion, generate, sampling_from_config
from rayalign.config import EvalConfig, to_dict, to_yaml
from rayalign.data import BAD_PROMPT, DataError, _is_messages, prompt_text_and_ids, read_rows, row_prompt
from rayalign.engines import resolve_backend
from rayalign.evaluation import (ModelSpec, balanced_swaps, expand_models, judge_swapped, mean_interval,
                                 outcome_score, plot_models, win_rate)
from rayalign.drivers.common import local_cpus
from rayalign.models.loading import check_model_dir, load_tokenizer
from rayalign.rewards.function import load_function
from rayalign.rewards.judges import build_judge
from rayalign.rewards.model import check_scorer_dir
from rayalign.tracking import MetricsLogger

logger = logging.getLogger("rayalign")

REFERENCE_COLUMNS = ("completion", "chosen")


def run_eval(cfg: EvalConfig) -> dict:
    """Run the eval job; returns the summary (also written to `<output_dir>/summary.json`)."""
    t_start = time.time()
    models = expand_models(cfg.models)  # every path, row and function checked before Ray starts
    rows = load_eval_rows(cfg)
    checker = load_function(cfg.checker, "checker") if cfg.checker else None
    for path, name in ((cfg.reward_model_path, "reward_model_path"),
                       (cfg.judge and cfg.judge.model_name_or_path, "judge.model_name_or_path")):
        if path:
            check_scorer_dir(path, name, trust_remote_code=cfg.trust_remote_code)
    for path, name in [(m.path, f"models ({m.name})") for m in models] + [
            (cfg.baseline if cfg.baseline != "reference" else None, "baseline")]:
        if path:  # files, safetensors headers, custom code: before any actor loads them
            check_model_dir(path, name, trust_remote_code=cfg.trust_remote_code)
    backend = resolve_backend(cfg.rollout.backend)
    ensure_ray(cfg.ray.address, _num_cpus(cfg), cfg.ray.namespace)
    files = storage.RunFiles(cfg.output_dir)
    tracker = MetricsLogger(files.local_dir, report_to=cfg.logging.report_to, run_name=cfg.logging.run_name,
                            project=cfg.logging.project, config_dict=to_dict(cfg))
    tracker.truncate_after(-1)  # a rerun into the same dir starts its metrics afresh
    groups: list[ActorGroup] = []
    try:
        judge = reward_actor = None
        if cfg.judge is not None:
            judge, group = build_judge(cfg.judge, max_length=cfg.max_length, trust_remote_code=cfg.trust_remote_code)
            groups.append(group)
        if cfg.reward_model_path:
            reward_actor, group = _reward_model(cfg)
            groups.append(group)
        sampling = sampling_from_config(cfg, n=cfg.num_samples)
        prompts = [r["prompt"] for r in rows for _ in range(cfg.num_samples)]  # prompt-major, like the samples
        baseline = baseline_scores = None
        if cfg.baseline == "reference":
            baseline = [_reference(r) for r in rows for _ in range(cfg.num_samples)]
        elif cfg.baseline:
            samples, _ = sample(cfg, cfg.baseline, rows, backend, sampling)
            baseline = [c["text"] for per_prompt in samples for c in per_prompt]
        if baseline is not None:
            baseline_scores = score(cfg, rows, prompts, baseline, None, checker, reward_actor)
        swapped = balanced_swaps(len(prompts), cfg.seed) if cfg.judge and cfg.judge.shuffle_order \
            else [False] * len(prompts)

        summaries = []
        with open(os.path.join(files.local_dir, "completions.jsonl"), "w") as out:
            for index, model in enumerate(models):
                samples, seconds = sample(cfg, model.path, rows, backend, sampling)
                flat = [c for per_prompt in samples for c in per_prompt]
                texts = [c["text"] for c in flat]
                scores = score(cfg, rows, prompts, texts, [c["token_ids"] for c in flat], checker, reward_actor)
                judged = given = raw = None
                if judge is not None:
                    pairs = [(as_completion(t, isinstance(p, list)), as_completion(b, isinstance(p, list)))
                             for t, b, p in zip(texts, baseline, prompts)]
                    judged, given = judge_swapped(judge, prompts, pairs, swapped)
                    raw = getattr(judge, "last_raw", None)
                for i, c in enumerate(flat):
                    out.write(json.dumps(_record(cfg, model, i, rows, c, scores, baseline, baseline_scores,
                                                 judged, given, raw, swapped), default=str) + "\n")
                out.flush()
                summary = _model_summary(model, flat, scores, judged, given, swapped, seconds, len(rows))
                summaries.append(summary)
                tracker.log(_flat_metrics(summary), step=index)
                logger.info("eval %s: %s", model.name, json.dumps(_flat_metrics(summary)))
        result = {
            "eval_dataset": cfg.eval_dataset, "num_prompts": len(rows), "num_samples": cfg.num_samples,
            "backend": backend, "baseline": cfg.baseline, "checker": cfg.checker,
            "reward_model_path": cfg.reward_model_path,
            "judge": None if cfg.judge is None else {"type": cfg.judge.type, "model": cfg.judge.model_name_or_path},
            "ci_method": "wilson (win rate, 0/1 checker); normal approximation (reward, float checker)",
            "models": summaries,
            "baseline_scores": None if baseline_scores is None else
            {k: mean_interval(v) for k, v in baseline_scores.items() if v is not None},
            "elapsed_s": time.time() - t_start,
        }
        with open(os.path.join(files.local_dir, "summary.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(files.local_dir, "eval_config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        panels = [("win_rate", "value", f"win rate vs {cfg.baseline}"),
                  ("checker", "mean", f"checker: {cfg.checker and cfg.checker.rpartition(':')[2]}"),
                  ("reward", "mean", f"reward: {os.path.basename(str(cfg.reward_model_path).rstrip('/'))}")]
        xlabel = "step" if all("@" in m.name for m in models) else "x"
        plot_models(summaries, panels, os.path.join(files.local_dir, "metrics.png"), xlabel)
        tracker.close()
        files.sync(extra=("completions.jsonl", "summary.json", "eval_config.yaml", "metrics.png"))
        return result
    finally:
        for group in groups:
            group.shutdown()


def load_eval_rows(cfg: EvalConfig) -> list[dict]:
    """The first `limit` rows, each with a usable prompt (and a reference when the baseline is)."""
    rows = read_rows(cfg.eval_dataset, "eval_dataset")[: cfg.limit]
    if not rows:
        raise DataError(f"eval_dataset: {cfg.eval_dataset} has no rows")
    for i, row in enumerate(rows):
        if row_prompt(row) is None:
            raise DataError(f"eval_dataset: {cfg.eval_dataset} row {i}, field 'prompt': {BAD_PROMPT}")
        if cfg.baseline == "reference" and _reference(row) is None:
            raise DataError(f"eval_dataset: {cfg.eval_dataset} row {i}: baseline=reference needs a "
                            f"{' or '.join(map(repr, REFERENCE_COLUMNS))} column")
    return rows


def sample(cfg: EvalConfig, path: str, rows: list[dict], backend: str, sampling: dict) -> tuple[list, float]:
    """Completions of the model at `path` (fresh rollout actors, shut down after)."""
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code, field="models")
    ids = [prompt_text_and_ids(r["prompt"], tokenizer)[1] for r in rows]
    rcfg = cfg.rollout
    group = ActorGroup(Rollout, GroupSpec.of("rollout", rcfg),
                       args=(path, rcfg, backend, None, rcfg.max_model_len, cfg.trust_remote_code, cfg.bf16),
                       env_vars=actor_env(rcfg), placement_timeout_s=cfg.ray.placement_timeout_s)
    try:
        group.call("ready", timeout=rcfg.generate_timeout_s)
        t = time.time()
        samples = generate(group, ids, sampling, seed=cfg.seed, version=0, timeout=rcfg.generate_timeout_s)
        return samples, time.time() - t
    finally:
        group.shutdown()


def score(cfg: EvalConfig, rows: list[dict], prompts: list, texts: list[str], completion_ids: list | None,
          checker, reward_actor) -> dict[str, list[float] | None]:
    """Checker values and reward-model scores of prompt-major completions (None: not asked)."""
    completions = [as_completion(t, isinstance(p, list)) for t, p in zip(texts, prompts)]
    reward_ref = reward_actor.score.remote(prompts, completions) if reward_actor is not None else None
    checked = None
    if checker is not None:
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"]
        columns = {k: [r.get(k) for r in rows for _ in range(cfg.num_samples)] for k in keys}
        values = checker(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(prompts):
            raise ValueError(f"checker ({cfg.checker}): returned {len(values)} values for {len(prompts)} completions")
        checked = [math.nan if v is None else float(v) for v in values]
    return {"checker": checked, "reward": ray.get(reward_ref) if reward_ref is not None else None}


def _reward_model(cfg: EvalConfig):
    from rayalign.actors.reward import RewardModel, RewardModelConfig

    sc = cfg.scoring
    group = ActorGroup(RewardModel, GroupSpec.of("reward-model", sc, 1, field="scoring"),
                       args=(RewardModelConfig(cfg.reward_model_path, batch_size=sc.batch_size,
                                               max_length=cfg.max_length, num_cpus=sc.num_cpus_per_actor,
                                               num_gpus=sc.num_gpus_per_actor, trust_remote_code=cfg.trust_remote_code),),
                       placement_timeout_s=cfg.ray.placement_timeout_s)
    ray.get(group.actors[0].ready.remote())
    return group.actors[0], group


def _reference(row: dict):
    for key in REFERENCE_COLUMNS:
        value = row.get(key)
        if (isinstance(value, str) and value.strip()) or _is_messages(value):
            return _text(value)
    return None


def _text(value) -> str:
    if isinstance(value, list):  # messages: the assistant's turns
        return "\n".join(str(m.get("content", "")) for m in value if m.get("role") == "assistant")
    return str(value)


def _record(cfg, model: ModelSpec, i: int, rows, c: dict, scores, baseline, baseline_scores, judged, given, raw,
            swapped) -> dict:
    k, j = divmod(i, cfg.num_samples)
    rec = {"model": model.name, "path": model.path, "x": model.x, "prompt_index": k, "sample": j,
           "prompt": rows[k]["prompt"], "completion": c["text"], "eos": c["eos"], "num_tokens": len(c["token_ids"]),
           "checker": _value(scores["checker"], i), "reward": _value(scores["reward"], i)}
    if baseline is not None:
        rec.update(baseline_completion=baseline[i], baseline_checker=_value(baseline_scores["checker"], i),
                   baseline_reward=_value(baseline_scores["reward"], i))
    if judged is not None:
        winner = "tie" if judged[i] < 0 else ("model", "baseline")[judged[i]]
        rec["judgment"] = {"winner": winner, "swapped": swapped[i], "answer": given[i],
                           "raw": raw[i] if raw else None}
        rec["score"] = outcome_score(judged[i])
    return rec


def _value(values, i):
    if values is None or math.isnan(values[i]):
        return None
    return values[i]


def _model_summary(model: ModelSpec, flat, scores, judged, given, swapped, seconds: float, num_prompts: int) -> dict:
    out = {"name": model.name, "path": model.path, "x": model.x, "num_prompts": num_prompts,
           "num_completions": len(flat), "generate_s": seconds,
           "eos_rate": sum(c["eos"] for c in flat) / len(flat),
           "mean_completion_tokens": sum(len(c["token_ids"]) for c in flat) / len(flat)}
    for key in ("checker", "reward"):
        if scores[key] is not None:
            out[key] = mean_interval(scores[key])
    if judged is not None:
        out["win_rate"] = {**win_rate(judged, given), "swapped": sum(swapped)}
    return out


def _flat_metrics(summary: dict) -> dict[str, float]:
    out = {"eos_rate": summary["eos_rate"], "mean_completion_tokens": summary["mean_completion_tokens"]}
    if summary["x"] is not None:
        out["x"] = summary["x"]
    for key, field in (("checker", "mean"), ("reward", "mean"), ("win_rate", "value")):
        if summary.get(key) and summary[key][field] is not None:
            out[key] = summary[key][field]
            if summary[key].get("ci95"):
                out[f"{key}_ci_low"], out[f"{key}_ci_high"] = summary[key]["ci95"]
    if "win_rate" in summary:
        out.update({f"judge_{k}": summary["win_rate"][k] for k in ("wins", "ties", "losses")})
    return out


def _num_cpus(cfg: EvalConfig) -> int:
    need = cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
    need += cfg.judge.num_cpus if cfg.judge is not None else 0
    need += cfg.scoring.num_cpus_per_actor if cfg.reward_model_path else 0
    return local_cpus(cfg.ray, need, spare=1)
