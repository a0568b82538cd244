"""The online DPO driver (OAIF): sample, rank, train, push weights — one synchronous step.

    rayalign online-dpo --config jobs/online-dpo-tiny.yaml

Per step: take a batch of prompts from the Ray Dataset; the rollout actors (vLLM or HF)
sample two completions per prompt with weight version v; reward functions / reward models
(or a pairwise judge) pick chosen and rejected; each learner gets its share of the pairs,
attaches reference log-probs (reference actor, adapter-off pass, or none) and takes one
DPO step; the new weights (version v+1) are pushed to every rollout actor and checked
(fingerprint of what each engine loaded, and log-probs of a probe sequence); then metrics
(TRL's names), the completions table and checkpoints. The driver holds no model.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import numpy as np

from rayalign import batch as batch_lib
from rayalign import data as data_lib
from rayalign import stream
from rayalign import weight_sync as weight_sync_lib
from rayalign.actors.group import ActorGroup, GroupSpec
from rayalign.actors.learner import PolicyLearner
from rayalign.actors.reference import Reference
from rayalign.actors.rollout import Rollout, actor_env, as_completion, generate, sampling_from_config
from rayalign.config import OnlineDPOConfig
from rayalign.data import DataError, TokenizeSettings
from rayalign.drivers import common, runner
from rayalign.engines import resolve_backend
from rayalign.models.loading import load_tokenizer
from rayalign.rewards import (RewardSources, check_reward_sources, probe_reward_functions, source_cpus,
                              source_labels)
from rayalign.rewards.judges import build_judge, check_judge_model, judge_pairs
from rayalign.tracking import average_metrics

logger = logging.getLogger("rayalign")

PROBE_ROWS = 4  # sample rows the reward functions are probed with before Ray starts
PLOT_KEYS = ["objective/scores", "eval_objective/scores", "rewards/margins", "objective/kl", "loss",
             "val/contain_eos_token"]


class Prompts:
    """The train (and eval) prompt rows, the way offline data goes (`rayalign.stream`, kind
    "prompt"): planned and sample-checked on the driver before anything starts, tokenized by
    Ray tasks once Ray runs (`tokenize`) into Ray Datasets in the object store. Each epoch
    shuffles the train set (seed + epoch) and hands it out a batch at a time. The driver keeps
    counts and a few sample rows for the reward-function probe, not the rows."""

    def __init__(self, cfg: OnlineDPOConfig):
        tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                                   field=cfg.tokenizer_field)
        settings = TokenizeSettings()  # not read for prompt rows: they are tokenized whole
        self.cfg = cfg
        self.tokenize_kwargs = dict(tokenizer_path=cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                                    settings=settings, kind="prompt", drop_bad_rows=cfg.drop_bad_rows,
                                    num_proc=cfg.dataset_num_proc)
        check = dict(kind="prompt", drop_bad_rows=cfg.drop_bad_rows)
        self.train_pieces = stream.plan(cfg.train_source, "train_dataset")
        rows, sample = stream.check_sample_rows(self.train_pieces, tokenizer, settings, field="train_dataset", **check)
        self.eval_pieces = None
        if cfg.eval_source:
            self.eval_pieces = stream.plan(cfg.eval_source, "eval_dataset")
            stream.check_sample(self.eval_pieces, tokenizer, settings, field="eval_dataset", **check)
        picks = np.linspace(0, sample.num_rows - 1, min(PROBE_ROWS, sample.num_rows)).astype(int)
        self.sample = data_lib.prompt_rows(sample.take(picks))  # a few rows spread over the checked ones
        self.batch = cfg.prompts_per_step
        self.prefetch = cfg.dataloader_prefetch_factor or 1  # batches Ray Data fetches ahead
        # data no larger than the sample was checked whole: too few prompts fail before Ray starts
        self.steps_per_epoch = None if rows is None else self._steps(rows)
        self.train = self.eval = None  # stream.Tokenized, once tokenize() ran
        self.conversational = None

    def _steps(self, rows: int) -> int:
        cfg = self.cfg
        if rows // self.batch < 1:
            raise DataError(f"train_dataset: {rows} prompts are too few for one step of "
                            f"{cfg.learner.num_actors} learner(s) x per_device_train_batch_size="
                            f"{cfg.per_device_train_batch_size} x gradient_accumulation_steps="
                            f"{cfg.gradient_accumulation_steps}")
        return rows // self.batch

    def tokenize(self) -> None:
        """Tokenize the prompts across the cluster (once Ray runs); bad rows fail here by file,
        row and field (or are dropped and counted), before any actor starts."""
        self.train = stream.tokenize(self.train_pieces, field="train_dataset", **self.tokenize_kwargs)
        self.steps_per_epoch = self._steps(self.train.num_rows)
        first = data_lib.prompt_rows(self.train.dataset.take_batch(1, batch_format="pyarrow"))[0]
        self.conversational = not isinstance(first["prompt"], str)
        if self.eval_pieces is not None:
            self.eval = stream.tokenize(self.eval_pieces, field="eval_dataset", **self.tokenize_kwargs)

    def epoch_batches(self, epoch: int, skip: int):
        """Row batches of one epoch (shuffled with seed + epoch; the last partial batch dropped),
        from batch `skip` on: a resumed run sees the batches an uninterrupted one does."""
        it = self.train.dataset.random_shuffle(seed=self.cfg.seed + epoch).iter_batches(
            batch_size=self.batch, batch_format="pyarrow", drop_last=True, prefetch_batches=self.prefetch)
        for i, batch in enumerate(it):
            if i >= skip:
                yield data_lib.prompt_rows(batch)

    def eval_batches(self, size: int):
        """The eval rows in file order, `size` at a time."""
        for batch in self.eval.dataset.iter_batches(batch_size=size, batch_format="pyarrow"):
            yield data_lib.prompt_rows(batch)


def train_online(cfg: OnlineDPOConfig, on_step: Callable[[runner.StepRecord], None] | None = None) -> dict:
    """Run online DPO to the end; returns final metrics, the model dir and the checkpoint.
    `on_step` gets a `StepRecord` after every step (the online benchmark times them)."""
    return runner.run(OnlineDPOJob(cfg), on_step=on_step)


class OnlineDPOJob(runner.Job):
    """Online DPO as the run skeleton drives it: learners, a reference, rollout engines and
    reward sources (or a judge); one step samples, ranks, trains and pushes weights."""

    name = "online-dpo"
    plot_keys = PLOT_KEYS
    log_files = ("metrics.jsonl", "weight_sync.jsonl")

    def __init__(self, cfg: OnlineDPOConfig):
        # paths, formats and every prompt file's first rows, before Ray starts; prepare()
        # tokenizes the rest across the cluster and sizes the run by the rows it kept
        self.prompts = Prompts(cfg)
        common.check_models(cfg)
        if cfg.judge is None:
            check_reward_sources(cfg.reward_sources, trust_remote_code=cfg.trust_remote_code)
            if self.prompts.sample:
                probe_reward_functions(cfg.reward_sources, self.prompts.sample)
            else:
                logger.warning("train_dataset: no usable prompt among the first rows of its files: the reward "
                               "functions are not probed before the first step")
        else:
            check_judge_model(cfg.judge, "judge", trust_remote_code=cfg.trust_remote_code)
        self.backend = resolve_backend(cfg.rollout.backend)
        super().__init__(cfg, cfg.max_steps if cfg.max_steps > 0 else None, None, cfg.prompts_per_step * 2)
        if self.prompts.steps_per_epoch is not None:  # small data, checked whole: sized before Ray starts
            self.size_by_epoch(self.prompts.steps_per_epoch)
        self.groups: list[ActorGroup] = []
        self.scorer = self.judge = self.batches = self.sync = None

    def num_cpus(self) -> int:
        cfg = self.cfg
        need = cfg.learner.num_actors * cfg.learner.num_cpus_per_actor
        need += cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
        if cfg.reference_mode == "actor":
            need += cfg.reference.num_actors * cfg.reference.num_cpus_per_actor
        need += source_cpus(cfg.reward_sources, cfg.scoring)
        if cfg.judge is not None:
            need += cfg.judge.num_cpus
        return common.local_cpus(cfg.ray, need, spare=1)

    def prepare(self) -> None:
        self.prompts.tokenize()
        if self.steps_per_epoch is None:
            self.size_by_epoch(self.prompts.steps_per_epoch)

    def start(self) -> ActorGroup:
        cfg = self.cfg
        self.epoch = None
        self.references = None
        if cfg.reference_mode == "actor":
            self.references = self._group(Reference, "reference", cfg.reference, args=(cfg,))
        self.learners = self._group(PolicyLearner, "learner", cfg.learner, args=(cfg,))
        self.rcfg = rcfg = weight_sync_lib.resolved_rollout_config(cfg, self.backend)  # engines: nccl or not
        self.rollouts = self._group(Rollout, "rollout", rcfg, env_vars=actor_env(rcfg), args=(
            cfg.model_name_or_path, rcfg, self.backend, cfg.tokenizer_path, rcfg.max_model_len or cfg.max_length,
            cfg.trust_remote_code, cfg.bf16))
        if cfg.judge is not None:
            self.judge, judge_group = build_judge(cfg.judge, max_length=cfg.max_length,
                                                  trust_remote_code=cfg.trust_remote_code,
                                                  nonfinite=cfg.nonfinite_scores)
            self.groups.append(judge_group)
        else:
            self.scorer = RewardSources(cfg.reward_sources, cfg.reward_weights, cfg.scoring, cfg.max_length,
                                        cfg.trust_remote_code, nonfinite=cfg.nonfinite_scores,
                                        labels=source_labels(cfg.reward_sources, len(cfg.reward_funcs)))

        self.learners.init_distributed(common.backend(cfg), cfg.learner.collective_timeout_s)
        refs = self.references
        handles = [refs.actors[i % len(refs)] if refs else None for i in range(len(self.learners))]
        info = self.learners.scatter("setup", [(self.total_steps, h) for h in handles])[0]
        logger.info("learners ready: %s; rollout backend %s x %d: %s", info, self.backend, len(self.rollouts),
                    self.rollouts.call("ready", timeout=rcfg.generate_timeout_s))
        return self.learners

    def _group(self, cls, role: str, section, args: tuple, env_vars: dict | None = None) -> ActorGroup:
        spec = GroupSpec.of(role, section)
        group = ActorGroup(cls, spec, args=args, env_vars=env_vars,
                           placement_timeout_s=self.cfg.ray.placement_timeout_s)
        self.groups.append(group)
        return group

    def begin(self, step: int) -> None:
        cfg = self.cfg
        self.sync = weight_sync_lib.build_channel(cfg, self.learners, self.rollouts, info_vocab=_vocab_size(cfg),
                                                  mode=self.rcfg.weight_sync)
        self.sync.push(version=step)  # engines start from the learner's (restored) weights
        self.rng = random.Random(cfg.seed * 7919 + step)
        self.sampling = sampling_from_config(cfg, n=2)

    def step(self, step: int) -> runner.StepResult:
        """generate -> score -> pairs -> reference + train (on the learners) -> push weights."""
        cfg, out = self.cfg, runner.StepResult({})
        rows = self._next_rows(step)
        t = time.time()
        completions = generate(self.rollouts, [r["prompt_ids"] for r in rows], self.sampling,
                               seed=cfg.seed * 1_000_003 + step * 104_729, version=self.sync.version,
                               timeout=cfg.rollout.generate_timeout_s)
        out.metrics["timing/generate_s"] = time.time() - t
        out.completion_lengths = [len(c["token_ids"]) for pair in completions for c in pair]

        t = time.time()
        flat = [c for pair in completions for c in pair]  # prompt-major: (p0 a, p0 b, p1 a, ...)
        scores, first_wins = self._rank(rows, flat, out.metrics)
        out.metrics["timing/score_s"] = time.time() - t

        pairs, out.table = _pairs(rows, completions, scores, first_wins, cfg.num_completions_to_log)
        if scores is not None:
            out.metrics["objective/scores_margin"] = float(np.mean([p["chosen_score"] - p["rejected_score"]
                                                                    for p in pairs]))
        out.metrics["val/contain_eos_token"] = float(np.mean([c["eos"] for c in flat]))

        self.sync.before_train()  # colocated engines give the GPU back until the push
        t = time.time()
        beta = cfg.beta_for_epoch(step // self.steps_per_epoch)
        n = len(self.learners)
        if n > 1 and cfg.learner.balance_tokens:  # the same pairs in each micro-batch slot, dealt by tokens
            shares, before, after = batch_lib.deal_rows(pairs, n, cfg.per_device_train_batch_size, cfg.max_length)
            out.metrics.update(batch_lib.imbalance_metrics(before, after))
        else:
            shares = [pairs[i * len(pairs) // n:(i + 1) * len(pairs) // n] for i in range(n)]
        results = self.learners.scatter("train_step", [(share, beta) for share in shares],
                                        timeout=cfg.learner.collective_timeout_s)
        out.metrics.update(average_metrics(results))
        out.metrics["timing/train_s"] = time.time() - t
        out.metrics.update(self.sync.push(version=step + 1))
        return out

    def _next_rows(self, step: int) -> list[dict]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            if self.batches is not None:
                self.batches.close()
            self.epoch, self.batches = epoch, self.prompts.epoch_batches(epoch, in_epoch)
        return next(self.batches)

    def _rank(self, rows: list[dict], flat: list[dict], metrics: dict):
        """(scores (n, 2) or None with a judge, first_wins (n,)): which sample of each pair is chosen."""
        cfg, n = self.cfg, len(rows)
        prompts = [r["prompt"] for r in rows]
        texts = [as_completion(c["text"], self.prompts.conversational) for c in flat]
        if self.scorer is not None:
            extra = {k: [r.get(k) for r in rows for _ in range(2)] for k in rows[0] if k not in ("prompt", "prompt_ids")}
            total, per_source = self.scorer.score([p for p in prompts for _ in range(2)], texts,
                                                  [c["token_ids"] for c in flat], [c["eos"] for c in flat],
                                                  cfg.missing_eos_penalty, **extra)
            scores = total.reshape(n, 2)
            metrics.update(per_source)
            metrics["objective/scores"] = float(total.mean())
            return scores, scores[:, 0] >= scores[:, 1]  # TRL: ties go to the first sample
        answers = judge_pairs(self.judge, prompts, [(texts[2 * i], texts[2 * i + 1]) for i in range(n)],
                              shuffle_order=cfg.judge.shuffle_order, rng=self.rng)
        metrics["judge/ties"] = float(np.mean([a < 0 for a in answers]))
        return None, np.array([(self.rng.random() < 0.5) if a < 0 else a == 0 for a in answers])

    @property
    def has_eval(self) -> bool:
        return self.prompts.eval_pieces is not None

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy completions for the eval prompts, scored by the reward sources. Prompts go out
        per_device_eval_batch_size per rollout actor at a time, as Trainer's eval loop hands each
        process per_device_eval_batch_size rows, and are scored as they come back (the driver
        holds one batch of eval rows). (TRL 1.16's OnlineDPOTrainer inherits Trainer's
        evaluate(), which fails on prompt-only rows: this evaluation is rayalign's own.)"""
        cfg = self.cfg
        sampling = {**sampling_from_config(cfg, n=1), "temperature": 0.0}
        eos, scores = [], []
        for rows in self.prompts.eval_batches(cfg.per_device_eval_batch_size * len(self.rollouts)):
            flat = [c[0] for c in generate(self.rollouts, [r["prompt_ids"] for r in rows], sampling, seed=cfg.seed,
                                           version=step, timeout=cfg.rollout.generate_timeout_s)]
            eos += [c["eos"] for c in flat]
            if self.scorer is not None:
                texts = [as_completion(c["text"], self.prompts.conversational) for c in flat]
                extra = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids")}
                total, _ = self.scorer.score([r["prompt"] for r in rows], texts, [c["token_ids"] for c in flat],
                                             [c["eos"] for c in flat], None, **extra)
                scores.append(total)
        metrics = {"eval_val/contain_eos_token": float(np.mean(eos))}
        if self.scorer is not None:
            metrics["eval_objective/scores"] = float(np.concatenate(scores).mean())
        return metrics

    def owns_dir(self, log_dir: str) -> None:
        self.sync.log_to(log_dir)

    def log_step(self, done: int, result: runner.StepResult, tracker) -> None:
        cfg = self.cfg
        every = cfg.log_completions_steps or cfg.every("logging", self.total_steps, self.steps_per_epoch)
        if cfg.log_completions and ((every and done % every == 0) or done == self.total_steps):
            tracker.log_table("completions", result.table[: cfg.num_completions_to_log], done)

    def log_extras(self) -> dict[str, float]:
        return {"sync/version": float(self.sync.version)}

    def summary(self) -> dict:
        return {"backend": self.backend}

    def stop(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None
        if self.batches is not None:  # an open Ray Data iterator outliving Ray would re-init it at exit
            self.batches.close()
            self.batches = None
        if self.scorer is not None:
            self.scorer.shutdown()
            self.scorer = None
        for group in self.groups:
            group.shutdown()
        self.groups = []
        self.judge = None


def _pairs(rows: list[dict], completions: list[list[dict]], scores, first_wins,
           table_size: int) -> tuple[list[dict], list[dict]]:
    """(training pairs: chosen / rejected token ids and scores of each prompt's two samples,
    the first `table_size` of them as rows of the completions table)."""
    pairs, table = [], []
    for i, (row, pair) in enumerate(zip(rows, completions)):
        c, r = (0, 1) if first_wins[i] else (1, 0)
        item = {"prompt_ids": row["prompt_ids"], "chosen_ids": pair[c]["token_ids"],
                "rejected_ids": pair[r]["token_ids"]}
        if scores is not None:
            item["chosen_score"], item["rejected_score"] = float(scores[i, c]), float(scores[i, r])
        pairs.append(item)
        if len(table) < table_size:
            table.append({"prompt": _as_text(row["prompt"]), "chosen": pair[c]["text"], "rejected": pair[r]["text"],
                          "chosen_score": item.get("chosen_score"), "rejected_score": item.get("rejected_score")})
    return pairs, table


def _vocab_size(cfg: OnlineDPOConfig) -> int:
    return len(load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                              field=cfg.tokenizer_field))


def _as_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


