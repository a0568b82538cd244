"""The `hf` rollout engine: transformers `generate` on a model the actor holds.

Weights: `load_state_dict` from the object store; over the nccl channel, a torch process
group of its own (NCCL, or gloo for CPU tests) receiving the learner's buckets.
"""

from __future__ import annotations

from typing import Any

import torch

from rayalign.actors.compute import on_compute_thread, use_threads
from rayalign.engines.base import RolloutEngine, cut_at_eos
from rayalign.models import weights as weights_lib
from rayalign.models.generate import left_padded
from rayalign.models.loading import load_causal_lm
from rayalign.weight_sync.base import WeightSyncError
from rayalign.weight_sync.nccl import TorchGroup, nbytes, plan_buckets, unpack


class HFEngine(RolloutEngine):
    name = "hf"

    @on_compute_thread
    def __init__(self, path: str, rcfg, tokenizer, *, max_model_len: int | None, trust_remote_code: bool,
                 bf16: bool):
        use_threads(self, max(1, int(rcfg.num_cpus_per_actor)))
        self.rcfg = rcfg
        self.tokenizer = tokenizer
        self.model = load_causal_lm(path, bf16=bf16, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.model.requires_grad_(False)
        if torch.cuda.is_available() and rcfg.num_gpus_per_actor > 0:
            self.model.to("cuda")
        self._group: TorchGroup | None = None

    @on_compute_thread
    @torch.no_grad()
    def generate(self, ids: list[list[int]], sampling: dict, seed: int | None, eos_ids: set[int]) -> list:
        n = int(sampling.get("n", 1))
        kwargs: dict[str, Any] = {"max_new_tokens": sampling["max_new_tokens"], "num_return_sequences": n,
                                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": sorted(eos_ids)}
        temperature = sampling.get("temperature", 1.0)
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=sampling.get("top_p", 1.0),
                          top_k=max(sampling.get("top_k") or 0, 0))  # -1 (vLLM's "off") is HF's 0
            if sampling.get("min_p") is not None:
                kwargs["min_p"] = sampling["min_p"]
        else:
            kwargs["do_sample"] = False
        if sampling.get("repetition_penalty", 1.0) != 1.0:
            kwargs["repetition_penalty"] = sampling["repetition_penalty"]
        kwargs.update(sampling.get("generation_kwargs") or {})
        if seed is not None:
            torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out: list[list[list[int]]] = []
        step = max(1, self.rcfg.hf_batch_size // n)
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            input_ids, mask = left_padded(chunk, pad)
            width = input_ids.shape[1]
            gen = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
            rows = gen[:, width:].cpu().tolist()
            for i in range(len(chunk)):
                out.append([cut_at_eos(rows[i * n + j], eos_ids, pad) for j in range(n)])
        return out

    @on_compute_thread
    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> dict:
        # Checked before anything is copied: a rejected push must leave the engine as it was.
        own = self.model.state_dict()
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in own if k not in state and k not in tied]
        unexpected = [k for k in state if k not in own]
        misshapen = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or misshapen:
            raise WeightSyncError(f"rollout (hf): pushed weights do not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, wrong shape {misshapen[:5]}")
        self.model.load_state_dict(state, strict=False)
        return self.fingerprint()

    def open_receiver(self, kind: str, host: str, port: int, world_size: int, rank_offset: int,
                      timeout_s: float) -> None:
        self._group = TorchGroup(kind, host, port, rank_offset, world_size, timeout_s)

    @on_compute_thread
    def receive(self, meta: list[dict], version: int) -> dict[str, float]:
        """The learner's buckets (`plan_buckets` of `meta`) into fresh buffers, then `load`."""
        fp = weights_lib.Fingerprint()
        state: dict[str, torch.Tensor] = {}
        for bucket in plan_buckets(meta):
            part = [meta[i] for i in bucket]
            buffer = torch.empty(sum(nbytes(m) for m in part), dtype=torch.uint8, device=self._group.device)
            self._group.broadcast(buffer)
            for m, tensor in zip(part, unpack(buffer, part)):
                fp.add(tensor)
                state[m["name"]] = tensor
        self.load(state)
        return fp.result()

    @on_compute_thread
    def fingerprint(self) -> dict:
        return weights_lib.fingerprint(self.model.parameters())

    @on_compute_thread
    def probe(self, ids: list[int]) -> list[float]:
        return weights_lib.probe_logprobs(self.model, ids)
