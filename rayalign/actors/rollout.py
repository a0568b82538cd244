"""Rollout actors: sample completions from the current policy, take new weights each step.

    generate(prompts, sampling, seed) -> GenerateResult (completions per prompt, version, rank)
    update_weights(state_dict, version, probe) -> LoadResult     (object-store channel)
    open_weight_sync(...) / receive_weights(meta, version, probe) -> LoadResult   (nccl channel)

The generation backend is a `RolloutEngine` from `rayalign.engines.ENGINES` (vLLM or HF,
one module each); the actor owns what every backend shares: the tokenizer, prompt encoding
(token ids — the driver applies the chat template once, so every backend sees the same
tokens —, strings, or message lists templated here), decoding, eos flags and the weight
version. Every result carries the weight version it was sampled with; the driver rejects
stale ones. `probe(ids)` returns the engine's log-probs of a fixed sequence so the driver
can check the weights it actually uses match the learner's.

Driver side: `generate` splits prompts over a group of these actors and checks versions;
`sampling_from_config` and `as_completion` are shared by the online-DPO and eval drivers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from rayalign.config import RolloutConfig
from rayalign.engines import Completion, GenerateResult, LoadResult, engine_class, resolve_backend
from rayalign.models.loading import load_tokenizer
from rayalign.weight_sync import WeightSyncError

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "generation_kwargs")


class StaleRolloutError(RuntimeError):
    """A rollout result was sampled with another weight version than the driver expects."""


def sampling_from_config(cfg, n: int = 2) -> dict[str, Any]:
    """The sampling options of an online-DPO / eval config as a plain dict (+ n per prompt)."""
    out = {k: getattr(cfg, k) for k in SAMPLING_FIELDS}
    out["n"] = n
    return out


def actor_env(rcfg: RolloutConfig) -> dict[str, str]:
    """Environment of a rollout actor: what its engine (`rcfg.backend`, auto resolved) needs."""
    return engine_class(resolve_backend(rcfg.backend)).actor_env(rcfg)


# ----------------------------------------------------------------------------- the actor


class Rollout:
    """One rollout engine. `backend` must already be resolved (a key of ENGINES)."""

    def __init__(self, model_name_or_path: str, rcfg: RolloutConfig, backend: str,
                 tokenizer_name_or_path: str | None = None, max_model_len: int | None = None,
                 trust_remote_code: bool = False, bf16: bool = False, *, rank: int = 0, world_size: int = 1):
        self.rcfg = rcfg
        self.rank = rank
        self.backend = backend
        self.version = 0
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                                        trust_remote_code=trust_remote_code)
        self.eos_ids = _eos_ids(self.tokenizer, model_name_or_path)
        self.engine = engine_class(backend)(model_name_or_path, rcfg, self.tokenizer, max_model_len=max_model_len,
                                            trust_remote_code=trust_remote_code, bf16=bf16)
        self._fingerprint: dict | None = None
        self._receiving = False  # nccl weight sync: joined the group (open_weight_sync)

    def ready(self) -> dict:
        return {"backend": self.backend, "rank": self.rank, "version": self.version}

    def pid(self) -> int:
        return os.getpid()

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], int)):
            return [int(t) for t in prompt]
        if isinstance(prompt, (list, tuple)):  # messages
            return list(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        return self.tokenizer(str(prompt), add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list, sampling: dict[str, Any], seed: int | None = None) -> GenerateResult:
        """n completions per prompt (sampling["n"]); each with token ids (eos kept when
        generated, nothing after it), decoded text (special tokens skipped) and an eos flag."""
        ids = [self.encode(p) for p in prompts]
        raw = self.engine.generate(ids, sampling, seed, self.eos_ids)
        completions = [[Completion(token_ids=toks, text=self.tokenizer.decode(toks, skip_special_tokens=True),
                                   eos=bool(toks) and toks[-1] in self.eos_ids) for toks in per_prompt]
                       for per_prompt in raw]
        return GenerateResult(version=self.version, rank=self.rank, prompt_ids=ids, completions=completions)

    def update_weights(self, state: dict[str, torch.Tensor], version: int,
                       probe: list[int] | None = None) -> LoadResult:
        """Load `state` (full weights, HF names; tensors or `to_object_store`'s numpy views)
        and adopt `version`; with `probe`, the engine's log-probs of it under the new weights
        come back in the same call."""
        from rayalign.models.weights import from_object_store

        t0 = time.time()
        self._fingerprint = self.engine.load(from_object_store(state))
        self.version = int(version)
        return self._loaded(t0, probe)

    def _loaded(self, t0: float, probe: list[int] | None) -> LoadResult:
        return LoadResult(version=self.version, rank=self.rank, fingerprint=self._fingerprint,
                          seconds=time.time() - t0, probe=None if probe is None else self.engine.probe(probe))

    def fingerprint(self) -> dict | None:
        """The fingerprint of the weights the engine holds (HF: read back from the model;
        vLLM: of the tensors its loader received — its packed kernels cannot be read)."""
        return self.engine.fingerprint() or self._fingerprint

    def probe(self, ids: list[int]) -> list[float]:
        return self.engine.probe(ids)

    def get_version(self) -> int:
        return self.version

    # ------------------------------------------------- cuda_ipc weight sync (rayalign/weight_sync/cuda_ipc.py)

    def gpu_uuid(self) -> str | None:
        """The physical GPU this actor was given (None on CPU)."""
        from rayalign.weight_sync.cuda_ipc import gpu_uuid

        return gpu_uuid() if torch.cuda.is_available() else None

    def open_ipc_receiver(self) -> None:
        self.engine.open_ipc_receiver()

    def receive_ipc(self, buckets: list[dict], version: int, probe: list[int] | None = None) -> LoadResult:
        """update_weights from the CUDA IPC buckets learner rank 0 exported on this GPU."""
        t0 = time.time()
        self._fingerprint = self.engine.receive_ipc(buckets, version)
        self.version = int(version)
        return self._loaded(t0, probe)

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next push (sleep_between_steps)."""
        self.engine.sleep()

    # ------------------------------------------------- nccl weight sync (rayalign/weight_sync/nccl.py)

    def open_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int, kind: str,
                         timeout_s: float) -> None:
        """Join the broadcast group whose rank 0 is learner rank 0 (this engine's processes
        take ranks rank_offset..)."""
        self.engine.open_receiver(kind, host, port, world_size, rank_offset, timeout_s)
        self._receiving = True

    def receive_weights(self, meta: list[dict], version: int, probe: list[int] | None = None) -> LoadResult:
        """update_weights over the group: receive the tensors `meta` lists (name, dtype,
        shape, in send order) while learner rank 0 broadcasts them, and adopt `version`."""
        if not self._receiving:
            raise WeightSyncError(f"rollout {self.rank}: receive_weights before open_weight_sync")
        t0 = time.time()
        self._fingerprint = self.engine.receive(meta, version)
        self.version = int(version)
        return self._loaded(t0, probe)


def _eos_ids(tokenizer, model_path: str) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_path)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    except (OSError, ValueError):
        pass
    return ids


# ----------------------------------------------------------------------------- driver side


def generate(rollouts, prompt_ids: list[list[int]], sampling: dict, seed: int, version: int,
             timeout: float) -> list[list[Completion]]:
    """Split prompts over the rollout actors (an ActorGroup); every part must carry weight
    `version`. Returns the completions per prompt, in prompt order."""
    parts = [list(p) for p in np.array_split(np.arange(len(prompt_ids)), len(rollouts)) if len(p)]
    refs = [rollouts.actors[i].generate.remote([prompt_ids[j] for j in part], sampling, seed + 7919 * i)
            for i, part in enumerate(parts)]
    results = rollouts.get(refs, timeout)
    return check_versions(results, version)


def check_versions(results: list[GenerateResult], version: int) -> list[list[Completion]]:
    """Concatenate rollout results, rejecting any sampled with other weights than `version`."""
    stale = [(r.rank, r.version) for r in results if r.version != version]
    if stale:
        raise StaleRolloutError(f"rollout results from weight versions {stale} (actor rank, version); "
                                f"the learner is at version {version}: a weight push was lost")
    return [c for r in results for c in r.completions]


def as_completion(text: str, conversational: bool):
    """A completion as scorers expect it: an assistant message for a conversational prompt,
    else the text (TRL's convention)."""
    return [{"role": "assistant", "content": text}] if conversational else text
