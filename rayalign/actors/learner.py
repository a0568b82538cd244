"""PolicyLearner: one DeepSpeed rank of the learner group.

Owns the trainable model, optimizer and scheduler. DeepSpeed (ZeRO 0-3) runs on GPU with
nccl and on CPU with its CPU accelerator and gloo, so one code path serves both. What it
optimises is the job's `Objective` (rayalign.objectives): each `train_step` takes
gradient_accumulation_steps micro-batches — from its own Ray Data shard (`set_data`,
offline jobs) or from the rows it is handed (online DPO's sampled pairs) — obtains
reference log-probs the way the objective says, and takes one optimizer step.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Iterator

import numpy as np
import ray
import torch

from rayalign import batch as batch_lib, faults, objectives
from rayalign.actors.compute import on_compute_thread, use_threads
from rayalign.actors.group import DistributedWorker
from rayalign.config import TrainConfig, is_adapter_dir
from rayalign.models import adapters
from rayalign.models.loading import (ModelLoadError, disable_dropout, load_causal_lm, load_reward_model,
                                     load_tokenizer)
from rayalign.weight_sync.base import WeightExport

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_scheduler(optimizer, cfg: TrainConfig, num_training_steps: int):
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup(num_training_steps),
                         num_training_steps=num_training_steps)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    zero: dict[str, Any] = {"stage": cfg.learner.zero_stage}
    if cfg.learner.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.learner.offload_optimizer and cfg.learner.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no fused_adam build on CPU
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.max_grad_norm > 0:
        config["gradient_clipping"] = cfg.max_grad_norm
    return config


class PolicyLearner(DistributedWorker):
    """One rank of the policy learner group (SFT, DPO, reward model or online DPO: the
    config's objective)."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int):
        self.cfg = cfg
        self.objective = objectives.for_config(cfg)
        self.rank = rank
        self.world_size = world_size
        use_threads(self, cfg.learner.torch_threads or max(1, int(cfg.learner.num_cpus_per_actor)))
        self.engine = None
        self.tokenizer = None
        self.reference = None  # a Reference actor handle in reference.mode=actor
        self._batches: Iterator | None = None
        self._loads: tuple[list[int], list[int]] = ([], [])  # each rank's tokens this step: as split, as dealt
        self.epoch = 0
        self.batches_consumed = 0  # micro-batches taken from the current epoch's shard
        self._grad_norm: float | None = None  # of the last optimizer step
        self.num_tokens = 0  # attention-mask tokens all learners have trained on in this run (TRL's num_tokens)
        self._weight_sender = None  # rank 0's end of the nccl weight-sync group
        self._ipc_buffers = None  # rank 0: the GPU buckets the last cuda_ipc export shares
        self._outgoing: dict | None = None  # prepared weights awaiting broadcast_weights

    # ------------------------------------------------------------------ setup

    @on_compute_thread
    def setup(self, num_training_steps: int, reference=None) -> dict:
        """Load the model, wrap it with DeepSpeed and build optimizer + scheduler."""
        import deepspeed

        cfg = self.cfg
        set_seed(cfg.seed)  # same seed on every rank: identical LoRA init
        self.reference = reference
        self.tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
        base_path = cfg.model_name_or_path
        if is_adapter_dir(base_path):  # continue training an adapter: load its base model first
            if not cfg.lora.enabled:
                raise ModelLoadError(f"model_name_or_path: {base_path} is a PEFT adapter dir; set lora.enabled=true")
            base_path = adapters.adapter_base_model(base_path)
        if self.objective.model_type == "reward":
            model = load_reward_model(base_path, pad_token_id=self.tokenizer.pad_token_id, bf16=cfg.bf16,
                                      trust_remote_code=cfg.trust_remote_code, init_kwargs=cfg.model_init_kwargs)
        else:
            model = load_causal_lm(base_path, bf16=cfg.bf16, trust_remote_code=cfg.trust_remote_code,
                                   init_kwargs=cfg.model_init_kwargs)
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.lora.enabled:
            model = self._wrap_lora(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.lora.enabled:
                model.enable_input_require_grads()
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(self._param_groups(model), lr=cfg.learning_rate,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        # A callable: DeepSpeed hands it the optimizer it actually steps (ZeRO rewrites the
        # param groups), so the schedule binds to the right groups.
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg, num_training_steps),
            config=deepspeed_config(cfg, self.world_size), dist_init_required=False)
        if self.world_size == 1 and cfg.learner.zero_stage == 0:
            # One rank has nothing to reduce, yet DeepSpeed's ZeRO-0 backward still flattens every
            # gradient into a buffer, all-reduces it over a group of one and copies it back (~6% of
            # the step at 17M parameters, profiled): skip it. The gradients are the same tensors.
            self.engine.enable_backward_allreduce = False
        self.engine.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return {"trainable_params": trainable, "total_params": total}

    def _wrap_lora(self, model):
        from peft import TaskType

        task = TaskType.SEQ_CLS if self.objective.model_type == "reward" else TaskType.CAUSAL_LM
        return adapters.wrap_policy(model, self.cfg, task)

    def _param_groups(self, model) -> list[dict]:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------ data

    def set_data(self, shard, epoch: int, skip_batches: int = 0) -> None:
        """Start reading `shard` (a Ray DataIterator) for `epoch`, skipping batches already
        trained on (exact resume)."""
        self.epoch = epoch
        self.batches_consumed = 0
        self._batches = iter(shard.iter_batches(
            batch_size=self.cfg.per_device_train_batch_size, batch_format="numpy", drop_last=True,
            prefetch_batches=self.cfg.dataloader_prefetch_factor or 1))
        for _ in range(skip_batches):
            next(self._batches)
            self.batches_consumed += 1

    def _collate(self, rows, pad: int):
        """A micro-batch; dataloader_pin_memory: in page-locked host memory on a GPU learner, so
        its copies to the device are DMA transfers (CPU learners have nothing to pin)."""
        batch, inputs = self.objective.collate(rows, pad)
        if self.cfg.dataloader_pin_memory and torch.device(self.engine.device).type == "cuda":
            batch = batch.pin_memory()
        return batch, inputs

    def _next_batch(self):
        rows = next(self._batches)  # StopIteration: the driver sized epochs wrong
        self.batches_consumed += 1
        return self._collate(self._balanced(rows), self.tokenizer.pad_token_id)

    def _balanced(self, rows):
        """This rank's rows of the group's next micro-batch (learner.balance_tokens): every
        rank's rows are gathered and dealt by tokens (`batch.deal_rows`), so the ranks'
        forward and backward passes take about the same time and none waits at the gradient
        all-reduce for a longer one. The group trains on the same rows in the same step (a
        per-pair loss gives the same gradient; a per-rank token mean, SFT's, weighs the rows as
        the deal groups them); the token loads before and after are kept for the `perf/` metrics."""
        if self.world_size == 1 or not self.cfg.learner.balance_tokens:
            return rows
        every: list = [None] * self.world_size
        torch.distributed.all_gather_object(every, batch_lib.as_row_list(rows))
        shares, before, after = batch_lib.deal_rows([r for part in every for r in part], self.world_size,
                                                    len(every[self.rank]), getattr(self.cfg, "max_length", None))
        self._loads = tuple([a + b for a, b in zip(old, new)] for old, new in zip(self._loads, (before, after)))
        return shares[self.rank]

    def drain(self) -> int:
        """Consume what is left of the epoch's shard (the split is coordinated across ranks)."""
        n = 0
        if self._batches is not None:
            for _ in self._batches:
                n += 1
        self._batches = None
        return n

    # ------------------------------------------------------------------ steps

    @on_compute_thread
    def train_step(self, rows: list[dict] | None = None, beta: float | None = None) -> dict[str, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches of
        per_device_train_batch_size rows: the next ones of the Ray Data shard, or `rows`
        (online DPO: sampled pairs with prompt_ids, chosen_ids, rejected_ids and optional
        chosen_score / rejected_score; `beta` this step's)."""
        faults.maybe_crash("train_step", int(self.engine.global_steps) + 1)
        cfg = self.cfg
        ga, per = cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size
        dealt = rows is None and self.world_size > 1 and cfg.learner.balance_tokens
        if rows is None:
            self._loads = ([0] * self.world_size, [0] * self.world_size)
            micro = [self._next_batch() for _ in range(ga)]
        else:
            if len(rows) != ga * per:
                raise ValueError(f"learner {self.rank}: got {len(rows)} pairs, expected "
                                 f"{ga} x per_device_train_batch_size={per}")
            micro = [self._collate(rows[i * per:(i + 1) * per], self.tokenizer.pad_token_id) for i in range(ga)]
        step_inputs = {} if beta is None else {"beta": beta}
        totals: dict[str, float] = {}
        pooled: dict[str, list[tuple[float, float]]] = {}  # (total, count) of each micro-batch
        for batch, inputs in micro:
            batch, reference = self._reference_later(batch)
            loss, metrics = self.objective.loss(self.engine, batch, reference, **inputs, **step_inputs)
            self.engine.backward(loss)
            self._step()
            for k, v in metrics.items():
                if isinstance(v, objectives.Pooled):
                    pooled.setdefault(k, []).append((float(v.total), float(v.count)))
                else:
                    totals[k] = totals.get(k, 0.0) + float(v)
        tokens = totals.pop(objectives.NUM_TOKENS, None)
        out = {k: v / ga for k, v in totals.items()}
        pooled, tokens = self._sum_over_learners(pooled, tokens)
        for k, parts in pooled.items():  # TRL: each micro-batch's ratio of the sums, then their mean
            out[k] = sum(total / count if count > 0 else 0.0 for total, count in parts) / len(parts)
        if tokens is not None:
            self.num_tokens += int(tokens)
            out[objectives.NUM_TOKENS] = float(self.num_tokens)
        if self._grad_norm is not None:
            out["grad_norm"] = self._grad_norm
        out["learning_rate"] = float(self.engine.get_lr()[0])
        if dealt:  # the same on every rank
            out.update(batch_lib.imbalance_metrics(*self._loads))
        return out

    def _sum_over_learners(self, pooled: dict[str, list[tuple[float, float]]], tokens: float | None):
        """(`pooled` with every micro-batch's total and count summed over the learner group,
        `tokens` summed over it) in one all-reduce — a collective: every rank calls it, with the
        same keys and micro-batch counts. float64 holds token counts exactly."""
        flat = [x for parts in pooled.values() for pair in parts for x in pair]
        flat += [] if tokens is None else [tokens]
        if self.world_size == 1 or not flat:
            return pooled, tokens
        summed = torch.tensor(flat, dtype=torch.float64, device=self.engine.device)
        torch.distributed.all_reduce(summed)
        values = iter(summed.tolist())
        pooled = {k: [(next(values), next(values)) for _ in parts] for k, parts in pooled.items()}
        return pooled, None if tokens is None else next(values)

    def _step(self) -> None:
        """engine.step(), keeping the pre-clipping gradient norm of an optimizer step (TRL's
        `grad_norm`). ZeRO 1-3 report it; with ZeRO-0 and a torch optimizer DeepSpeed does
        not, so it is taken here from the (already all-reduced) gradients."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.cfg.learner.zero_stage == 0:
            grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
                if grads else 0.0
        self.engine.step()
        if boundary:
            reported = self.engine.get_global_grad_norm()
            self._grad_norm = norm if reported is None else float(reported)

    @on_compute_thread
    def export_weights(self, probe: list[int] | None = None) -> WeightExport | None:
        """The weights rollout engines load, for a push: on rank 0 a `WeightExport` with the
        state dict in Ray's object store (`state`: a ref, base-model names, LoRA merged into
        a copy, a tied lm_head left out), its `fingerprint`, and the log-probs of `probe`.
        Every rank must call it (ZeRO-3 gathers)."""
        from rayalign.models import weights as weights_lib

        # On CPU the live tensors go straight into the object store (ray.put copies them there)
        on_cpu = torch.device(self.engine.device).type == "cpu"
        state, probe_logps = self._weights_for_push(probe, copy_to=None if on_cpu else "cpu")
        if self.rank != 0:
            return None
        return WeightExport(fingerprint=weights_lib.fingerprint(state.values()), probe=probe_logps,
                            num_tensors=len(state), state=ray.put(weights_lib.to_object_store(state)))

    def _weights_for_push(self, probe: list[int] | None, copy_to: str | None):
        """(state on rank 0 else None, probe log-probs): what export_weights /
        prepare_weights hand out. Collective under ZeRO-3."""
        from rayalign.models import weights as weights_lib

        module = self.engine.module
        if self.cfg.learner.zero_stage == 3:
            state = self.full_state_dict()
        else:
            state = weights_lib.export_state_dict(module, copy_to) if self.rank == 0 else None
        probe_logps = None
        if probe is not None:
            was_training = module.training
            module.eval()
            probe_logps = weights_lib.probe_logprobs(module, probe)
            module.train(was_training)
        if state is not None and getattr(self._base_config(), "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state, probe_logps

    # ------------------------------------------------------------------ nccl weight sync (rayalign/weight_sync/nccl.py)

    def open_weight_sync(self, host: str, port: int, world_size: int, kind: str, timeout_s: float) -> None:
        """Rank 0: become rank 0 of the broadcast group with the rollout engines."""
        from rayalign import weight_sync

        self._weight_sender = weight_sync.Sender(kind, host, port, world_size, timeout_s)

    @on_compute_thread
    def prepare_weights(self, probe: list[int] | None = None) -> WeightExport | None:
        """export_weights for the broadcast channel: the state stays where it lives until
        `broadcast_weights`; rank 0 returns a `WeightExport` with its metadata (`meta`: name,
        dtype, shape in send order), `fingerprint` and the probe log-probs. Every rank must
        call it."""
        from rayalign import weight_sync

        state, probe_logps = self._weights_for_push(probe, copy_to=None)
        if self.rank != 0:
            return None
        self._outgoing = state
        return WeightExport(fingerprint=weight_sync.sent_fingerprint(state), probe=probe_logps,
                            num_tensors=len(state), meta=weight_sync.describe(state))

    @on_compute_thread
    def export_ipc(self, probe: list[int] | None = None, bucket_bytes: int | None = None) -> WeightExport | None:
        """export_weights for the cuda_ipc channel: rank 0 packs the push's tensors into GPU
        buckets, exports each as a CUDA IPC handle and keeps the buffers until `release_ipc`;
        `meta` holds the buckets' update infos for the engines (rayalign/weight_sync/cuda_ipc.py)."""
        from rayalign import weight_sync
        from rayalign.weight_sync import cuda_ipc

        state, probe_logps = self._weights_for_push(probe, copy_to=None)
        if self.rank != 0:
            return None
        self._ipc_buffers, buckets = cuda_ipc.bucket_infos(state, bucket_bytes or weight_sync.nccl.BUCKET_BYTES)
        return WeightExport(fingerprint=weight_sync.sent_fingerprint(state), probe=probe_logps,
                            num_tensors=len(state), meta=buckets)

    def release_ipc(self) -> None:
        """Drop the buffers the last export_ipc shared (every engine has loaded them)."""
        import torch

        self._ipc_buffers = None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()

    def gpu_uuid(self) -> str | None:
        import torch

        from rayalign.weight_sync.cuda_ipc import gpu_uuid

        return gpu_uuid() if torch.cuda.is_available() else None

    @on_compute_thread
    def broadcast_weights(self) -> None:
        """Rank 0: broadcast what prepare_weights took (the engines receive at the same time)."""
        state, self._outgoing = self._outgoing, None
        self._weight_sender.send(state)

    def _base_config(self):
        module = self.engine.module
        return module.get_base_model().config if self.cfg.lora.enabled else module.config

    @on_compute_thread
    @torch.no_grad()
    def sum_eval_metrics(self, batches: list, weights: list[float]) -> dict:
        """Weighted metric sums over eval batches (or object refs of them: the driver keeps
        the eval set in the object store; weight 0 pads ranks to equal counts, so every rank
        runs the same number of forwards — ZeRO-3 gathers need that); under "__pooled__" the
        weighted totals and counts of the `objectives.Pooled` metrics."""
        batches = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in batches]
        self.engine.eval()
        sums: dict[str, float] = {}
        pooled: dict[str, tuple[float, float]] = {}
        total = 0.0
        for batch, w in zip(batches, weights):
            batch = self._with_reference(batch)
            _, metrics = self.objective.loss(self.engine, batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * w * len(batch)
                if isinstance(v, objectives.Pooled):
                    t, c = pooled.get(k, (0.0, 0.0))
                    pooled[k] = (t + w * float(v.total), c + w * float(v.count))
            total += w * len(batch)
        if objectives.NUM_TOKENS in sums:  # TRL's eval_num_tokens is the training total so far,
            sums[objectives.NUM_TOKENS] = self.num_tokens * total  # weighted like a sum: / count gives it
        self.engine.train()
        return {"__count__": total, "__pooled__": pooled, **sums}

    def _reference_later(self, batch):
        """(batch, None) with reference log-probs attached, or, with a reference actor,
        (batch, wait): the request is sent now and `wait()` returns its answer, so that the
        reference's forward runs while the learner does its own."""
        if self.objective.reference_mode == "actor" and batch.ref_chosen_logps is None:
            pending = self.reference.logprobs.remote(batch)
            timeout = self.cfg.learner.collective_timeout_s
            return batch, lambda: ray.get(pending, timeout=timeout)
        return self._with_reference(batch), None

    def _with_reference(self, batch):
        cfg, mode = self.cfg, self.objective.reference_mode
        if mode is None or batch.ref_chosen_logps is not None:
            return batch
        if mode == "none":
            return batch
        if mode in ("implicit", "adapter"):  # the policy's own weights: adapter off, or the frozen copy
            with adapters.reference_weights(self.engine.module, cfg):
                ref_c, ref_r = objectives.reference_logprobs(self.engine, batch, cfg)
            return batch.with_reference(ref_c, ref_r)
        if mode == "actor":
            ref_c, ref_r = ray.get(self.reference.logprobs.remote(batch),
                                   timeout=cfg.learner.collective_timeout_s)
            return batch.with_reference(ref_c, ref_r)
        raise RuntimeError(f"reference.mode={mode}: batch arrived without ref_*_logps columns")

    @on_compute_thread
    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int) -> dict[str, list[str]]:
        """Greedy completions of the policy (and, for a LoRA policy, of its reference: the
        adapter-off model or the frozen reference adapter). Every rank runs it: under ZeRO-3
        each forward gathers parameters."""
        from rayalign.models.generate import generate_texts

        module = self.engine.module
        out = {"prompts": self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=False),
               "completions": generate_texts(module, self.tokenizer, prompt_ids, max_new_tokens)}
        if self.cfg.lora.enabled:
            own = self.objective.reference_mode in ("implicit", "adapter")
            with adapters.reference_weights(module, self.cfg) if own else module.disable_adapter():
                out["reference_completions"] = generate_texts(module, self.tokenizer, prompt_ids,
                                                              max_new_tokens)
        module.config.use_cache = False
        return out

    # ------------------------------------------------------------------ weights and state

    @on_compute_thread
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full (gathered) model weights on rank 0, None elsewhere. Collective under ZeRO-3."""
        if self.cfg.learner.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    @on_compute_thread
    def save(self, staging_dir: str, *, with_state: bool = True) -> None:
        """Write HF files (rank 0) and learner/RNG state (every rank) into `staging_dir`;
        `with_state=False` (save_only_model): the HF files only."""
        from rayalign.checkpoint import save_rng_state

        os.makedirs(staging_dir, exist_ok=True)
        faults.maybe_crash("save", int(self.engine.global_steps))
        state = self.full_state_dict()
        if self.rank == 0:
            module = self.engine.module
            if self.cfg.lora.enabled:  # the trained adapter alone, never a reference adapter
                adapters.save_trained_adapter(module, staging_dir, state, self.cfg)
            else:
                shard = {"max_shard_size": self.cfg.save_max_shard_size} if self.cfg.save_max_shard_size else {}
                module.save_pretrained(staging_dir, state_dict=state, safe_serialization=True, **shard)
            self.tokenizer.save_pretrained(staging_dir)
            gen = getattr(module, "generation_config", None)
            if gen is not None and not self.cfg.lora.enabled:
                gen.save_pretrained(staging_dir)
        if with_state:
            self._save_state(staging_dir)
            save_rng_state(staging_dir, self.rank)
        torch.distributed.barrier()

    def _save_state(self, staging_dir: str) -> None:
        """Optimizer, scheduler and engine counters without pickle (rayalign.checkpoint.save_state)
        in place of DeepSpeed's save_checkpoint. Rank 0 writes what every rank holds alike: the
        trainable weights (ZeRO 0-2; ZeRO-3 restores them from its fp32 partitions), the
        scheduler, the counters and, unpartitioned (ZeRO-0), the optimizer; with ZeRO each rank
        writes its own optimizer partition."""
        from rayalign.checkpoint import LEARNER_STATE, save_state

        engine = self.engine
        directory = os.path.join(staging_dir, LEARNER_STATE)
        os.makedirs(directory, exist_ok=True)
        if self.rank == 0:
            shared = {"zero_stage": self.cfg.learner.zero_stage, "world_size": self.world_size,
                      "engine": {"global_steps": int(engine.global_steps),
                                 "global_samples": int(engine.global_samples),
                                 "skipped_steps": int(engine.skipped_steps)},
                      "num_tokens": self.num_tokens,
                      "lr_scheduler": engine.lr_scheduler.state_dict()}
            if self.cfg.learner.zero_stage < 3:
                shared["module"] = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
            if not engine.zero_optimization():
                shared["optimizer"] = engine.optimizer.state_dict()
            save_state(os.path.join(directory, "shared"), shared)
        if engine.zero_optimization():
            save_state(os.path.join(directory, f"rank_{self.rank}"), {"optimizer": engine.optimizer.state_dict()})

    @on_compute_thread
    def load(self, checkpoint_dir: str) -> None:
        """Restore weights, optimizer, scheduler, counters and RNG from a checkpoint dir.
        Mirrors DeepSpeed's load_checkpoint, reading rayalign's pickle-free files instead."""
        from rayalign import checkpoint as ckpt

        ckpt.check_resumable(checkpoint_dir)  # refuses older, pickled DeepSpeed state
        engine = self.engine
        directory = os.path.join(checkpoint_dir, ckpt.LEARNER_STATE)
        shared = ckpt.load_state(os.path.join(directory, "shared"))
        saved = (shared.get("zero_stage"), shared.get("world_size"))
        if saved != (self.cfg.learner.zero_stage, self.world_size):
            raise ckpt.CheckpointError(
                f"{checkpoint_dir}: saved with learner.zero_stage={saved[0]} on {saved[1]} learner(s); this run "
                f"has learner.zero_stage={self.cfg.learner.zero_stage} on {self.world_size}: resume with those")
        if engine._optimizer_has_ckpt_event_prologue():
            engine.optimizer.checkpoint_event_prologue()
        try:
            if self.cfg.learner.zero_stage < 3:
                self._load_trainable_weights(shared["module"])
            if engine.zero_optimization():
                own = ckpt.load_state(os.path.join(directory, f"rank_{self.rank}"))["optimizer"]
                own = ckpt.restore_objects(own, engine.optimizer.state_dict())
                engine.optimizer.load_state_dict(
                    state_dict_list=[own if r == self.rank else None for r in range(self.world_size)],
                    load_optimizer_states=True, load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
                    checkpoint_folder=None, load_serial=None, param_shapes=engine._get_zero_param_shapes())
            else:
                state = ckpt.restore_objects(shared["optimizer"], engine.optimizer.state_dict())
                if engine.fp16_enabled() or engine.bfloat16_enabled():
                    engine.optimizer.load_state_dict(state, load_optimizer_states=True)
                else:
                    engine.optimizer.load_state_dict(state)
            engine.lr_scheduler.load_state_dict(shared["lr_scheduler"])
            counters = shared["engine"]
            engine.global_steps = int(counters["global_steps"])
            engine.global_samples = int(counters["global_samples"])
            engine.skipped_steps = int(counters["skipped_steps"])
            self.num_tokens = int(shared.get("num_tokens", 0))  # 0: a checkpoint from before it was counted
        except (KeyError, TypeError, ValueError, IndexError, AssertionError) as exc:
            if isinstance(exc, ckpt.CheckpointError):
                raise
            raise ckpt.CheckpointError(f"{checkpoint_dir}: learner state does not fit this run "
                                       f"({type(exc).__name__}: {exc})") from exc
        if engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()
        ckpt.load_rng_state(checkpoint_dir, self.rank)

    @torch.no_grad()
    def _load_trainable_weights(self, saved: dict) -> None:
        """Copy the saved trainable weights into the module (frozen ones come from setup)."""
        from rayalign.checkpoint import CheckpointError

        params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        if not isinstance(saved, dict) or saved.keys() != params.keys():
            missing = sorted(params.keys() - saved.keys()) if isinstance(saved, dict) else []
            raise CheckpointError(f"saved trainable weights do not match this model's (missing: {missing[:3]})")
        for name, p in params.items():
            value = saved[name]
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                raise CheckpointError(f"saved weight {name} does not fit this model's {tuple(p.shape)}")
            p.data.copy_(value)

