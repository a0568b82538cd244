"""Weight transfer helpers shared by the learner and the rollout engines.

* `export_state_dict`: the policy's full weights under the base model's names; a LoRA
  policy's adapter deltas are added into a copy (the learner's model is never merged).
* `fingerprint`: order- and layout-independent moments of a set of tensors (vLLM fuses
  q/k/v and pads the vocabulary, so a byte hash of HF-named tensors would not compare).
  Two fingerprints match when the same float values were loaded. `Fingerprint` computes
  the same moments while tensors stream past (a broadcast), on their own device.
* `probe_logprobs`: log-probs of a fixed token sequence; the rollout engine computes the
  same numbers, which shows the weights it *uses* are the learner's (vLLM on CPU repacks
  its linear weights into kernels that cannot be read back).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

PROBE_LENGTH = 24


def export_state_dict(module: torch.nn.Module, copy_to: str | None = "cpu") -> dict[str, torch.Tensor]:
    """Copies on `copy_to` of the weights a serving engine loads; `copy_to=None`: the
    module's own tensors where they live (read-only views for a broadcast; merged LoRA
    weights are new tensors either way). Tied tensors stay one object."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(module, PeftModel):
        return _merged_lora_state_dict(module, copy_to)
    return _dedup_copy(module.state_dict(), copy_to)


def to_object_store(state: dict[str, torch.Tensor]) -> dict[str, "object"]:
    """`state` as Ray's object store carries it fastest: CPU tensors of a dtype numpy has as
    numpy views (ray.put copies their buffers out of band in one pass, and a reader maps them
    without unpickling); others (bf16, GPU) stay tensors. Measured for 68 MB of fp32 weights:
    put 95-135 -> 13-49 ms, the rollout's load call 29-52 -> 10-12 ms."""
    out: dict[str, object] = {}
    for name, tensor in state.items():
        numpy_ok = tensor.device.type == "cpu" and tensor.dtype not in (torch.bfloat16, torch.float8_e4m3fn,
                                                                          torch.float8_e5m2)
        out[name] = tensor.detach().numpy() if numpy_ok else tensor
    return out


def from_object_store(state: dict[str, "object"]) -> dict[str, torch.Tensor]:
    """The tensors of a `to_object_store` dict (numpy arrays read from the object store are
    read-only views of it: loaders copy them into their own parameters)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


def _dedup_copy(state: dict[str, torch.Tensor], copy_to: str | None = "cpu") -> dict[str, torch.Tensor]:
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if key not in copies:
            copies[key] = tensor.detach() if copy_to is None else tensor.detach().to(copy_to, copy=True)
        out[name] = copies[key]
    return out


@torch.no_grad()
def _merged_lora_state_dict(peft_model, copy_to: str | None = "cpu") -> dict[str, torch.Tensor]:
    """W + scale * B @ A for every LoRA layer, computed into new tensors."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    merged: dict[str, torch.Tensor] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            weight = mod.get_base_layer().weight
            w = (weight + mod.get_delta_weight(adapter).to(weight.dtype)).detach()
            merged[f"{name}.weight"] = w if copy_to is None else w.to(copy_to)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in _dedup_copy(base.state_dict(), copy_to).items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = merged.get(clean, tensor)
    return out


def fingerprint(tensors: Iterable[torch.Tensor]) -> dict[str, float]:
    """Sum, sum of squares and sum of cubes in float64 over every distinct tensor."""
    seen: set[int] = set()
    s1 = s2 = s3 = 0.0
    for t in tensors:
        if t is None or t.numel() == 0 or id(t) in seen:
            continue
        seen.add(id(t))
        x = t.detach().to("cpu", torch.float64)
        x2 = x * x
        s1 += float(x.sum())
        s2 += float(x2.sum())
        s3 += float(x2.mul_(x).sum())
    return {"sum": s1, "sumsq": s2, "sumcube": s3}


class Fingerprint:
    """`fingerprint` accumulated tensor by tensor as they stream past (sent or received),
    on the tensors' own device and stream, without de-duplication: sender and receiver add
    the same list of tensors in the same order."""

    CHUNK = 1 << 24  # elements per float64 pass: bounds the temporary copy

    def __init__(self):
        self._parts: list[torch.Tensor] = []  # per-tensor moments, kept until `result`

    @torch.no_grad()
    def add(self, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), self.CHUNK):
            x = flat[start:start + self.CHUNK].to(torch.float64)
            x2 = x * x
            self._parts.append(torch.stack([x.sum(), x2.sum(), (x2 * x).sum()]))

    def result(self) -> dict[str, float]:
        if not self._parts:
            return {"sum": 0.0, "sumsq": 0.0, "sumcube": 0.0}
        if any(p.is_cuda for p in self._parts):
            torch.cuda.synchronize()  # parts may come from several streams (vLLM's packed receive)
        s = torch.stack(self._parts).sum(0).tolist()
        return {"sum": s[0], "sumsq": s[1], "sumcube": s[2]}


def fingerprints_match(a: dict[str, float], b: dict[str, float], rtol: float = 1e-9) -> bool:
    return all(math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=rtol) for k in ("sum", "sumsq", "sumcube"))


def probe_ids(vocab_size: int, length: int = PROBE_LENGTH) -> list[int]:
    """A fixed token sequence spread over the vocabulary (the same on every process)."""
    step = max(1, vocab_size // (length + 1))
    return [(7 + i * step) % vocab_size for i in range(length)]


@torch.no_grad()
def probe_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under an HF causal LM."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logps = logits.log_softmax(-1)
    return [float(logps[t - 1, ids[t]]) for t in range(1, len(ids))]
