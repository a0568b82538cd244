"""The rollout-engine interface: what a `Rollout` actor needs from a generation backend.

A backend is one module in `rayalign/engines/` with a `RolloutEngine` subclass, listed in
`ENGINES` (rayalign/engines/__init__.py). The actor owns the tokenizer, prompt encoding,
decoding and the weight version; the engine generates token ids, loads weights from each
weight-sync channel, fingerprints what it loaded and computes probe log-probs. The
class-level facts (`available`, `receiving_ranks`, `group_kind`, `actor_env`) let the
drivers and weight-sync channels ask a backend instead of testing its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

import torch


class Completion(TypedDict):
    """One sampled completion: token ids (eos kept when generated, nothing after it), the
    decoded text (special tokens skipped) and whether it ended with eos. A TypedDict
    because the drivers read it by key."""

    token_ids: list[int]
    text: str
    eos: bool


@dataclass(frozen=True)
class GenerateResult:
    """What `Rollout.generate` returns: the completions per prompt (n each), the prompt ids
    the engine saw, and the weight `version` and actor `rank` that sampled them (the driver
    rejects results of another version)."""

    version: int
    rank: int
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]


@dataclass(frozen=True)
class LoadResult:
    """What a weight load (`update_weights` / `receive_weights`) returns: the version the
    actor adopted, the fingerprint of what its engine loaded, the seconds taken and, when
    asked for, the engine's probe log-probs under the new weights."""

    version: int
    rank: int
    fingerprint: dict[str, float] | None
    seconds: float
    probe: list[float] | None = None


class RolloutEngine(ABC):
    """One generation backend inside a rollout actor (constructed once per actor)."""

    name: ClassVar[str]
    install_hint: ClassVar[str] = ""  # how to install it, for the error when it is missing

    @abstractmethod
    def __init__(self, path: str, rcfg, tokenizer, *, max_model_len: int | None, trust_remote_code: bool,
                 bf16: bool):
        ...

    # -------------------------------------------------------------- class-level facts

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can run here (its package is importable)."""
        return True

    @classmethod
    def receiving_ranks(cls, rcfg) -> int:
        """Processes of one engine that join the nccl broadcast group."""
        return 1

    @classmethod
    def group_kind(cls, learner_on_gpu: bool) -> str:
        """The nccl channel's wire for this engine: a torch group (`nccl` on GPU learners,
        `gloo` on CPU ones, tests), or an engine's own wire (its name; see `open_sender`)."""
        return "nccl" if learner_on_gpu else "gloo"

    @classmethod
    def prefers_nccl(cls) -> bool:
        """Whether `rollout.weight_sync: auto` picks nccl for this engine on whole GPUs."""
        return False

    @classmethod
    def receives_ipc(cls) -> bool:
        """Whether the engine can load weights from CUDA IPC handles (the cuda_ipc channel)."""
        return False

    @classmethod
    def actor_env(cls, rcfg) -> dict[str, str]:
        """Environment variables the rollout actor needs before the engine is imported."""
        return {}

    @classmethod
    def open_sender(cls, host: str, port: int, world_size: int, timeout_s: float):
        """Learner rank 0's end of this engine's own wire (only for engines whose
        `group_kind` is their name); an object with `send(state)`."""
        raise NotImplementedError(f"rollout engine {cls.name!r} has no weight-sync wire of its own")

    # -------------------------------------------------------------- per actor

    @abstractmethod
    def generate(self, ids: list[list[int]], sampling: dict[str, Any], seed: int | None,
                 eos_ids: set[int]) -> list[list[list[int]]]:
        """`sampling["n"]` completions (token ids, cut after eos) per prompt of `ids`."""

    @abstractmethod
    def load(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """The object-store channel: load full weights (HF names); returns the fingerprint
        of what was loaded. A rejected state must leave the engine as it was."""

    @abstractmethod
    def open_receiver(self, kind: str, host: str, port: int, world_size: int, rank_offset: int,
                      timeout_s: float) -> None:
        """The nccl channel: join the broadcast group (ranks rank_offset..); blocks until
        every rank joined."""

    @abstractmethod
    def receive(self, meta: list[dict], version: int) -> dict[str, float]:
        """The nccl channel: receive one push of the tensors `meta` lists (name, dtype,
        shape, in send order) and load it; returns the fingerprint of the received tensors."""

    def open_ipc_receiver(self) -> None:
        """The cuda_ipc channel: get ready to load from IPC handles (engines that `receives_ipc`)."""
        raise NotImplementedError(f"rollout engine {self.name!r} cannot load weights over CUDA IPC")

    def receive_ipc(self, buckets: list[dict], version: int) -> dict[str, float]:
        """The cuda_ipc channel: load the buckets (`weight_sync.cuda_ipc.bucket_infos`) the
        learner exported; returns the fingerprint of the received tensors."""
        raise NotImplementedError(f"rollout engine {self.name!r} cannot load weights over CUDA IPC")

    def sleep(self) -> None:
        """Free the GPU memory the engine holds (its weights are replaced by the next load)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo `sleep` for `tags` ("weights", "kv_cache"; None: all)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, float] | None:
        """The fingerprint of the weights the engine holds, or None where they cannot be
        read back (the actor then reports the last loaded one)."""

    @abstractmethod
    def probe(self, ids: list[int]) -> list[float]:
        """Log-probs of `ids[1:]` given their prefixes under the engine's weights."""


def cut_at_eos(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """`tokens` up to and including the first eos; trailing padding (not eos) dropped.
    Every engine returns its completions in this form."""
    out = []
    for t in tokens:
        out.append(t)
        if t in eos_ids:
            return out
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out
