"""Model and tokenizer loading: everything goes through `from_pretrained(path_or_id)`.

Safe defaults: `trust_remote_code` is off unless the config asks, weights load from
safetensors only (`use_safetensors=True`), and a tokenizer without pad or eos is rejected
with an error naming the path before any training starts.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be used; the message names it."""


def _check_exists(path_or_id: str, field: str) -> None:
    # A path that looks local but does not exist is almost always a typo; hub ids have
    # exactly one slash and no leading "." or "/".
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_local and not Path(path_or_id).expanduser().exists():
        raise ModelLoadError(f"{field}: path does not exist: {path_or_id}")


def load_tokenizer(path_or_id: str, *, trust_remote_code: bool = False, field: str = "tokenizer_name_or_path"):
    """AutoTokenizer with pad and eos checked (pad falls back to eos, as TRL does). A PEFT
    adapter dir without tokenizer files gives its base model's tokenizer."""
    from transformers import AutoTokenizer

    _check_exists(path_or_id, field)
    path_or_id = _tokenizer_source(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot load a tokenizer from {path_or_id!r}: {exc}") from exc
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{field}: tokenizer at {path_or_id!r} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_source(path_or_id: str) -> str:
    import json

    from rayalign.config import is_adapter_dir

    p = Path(path_or_id).expanduser()
    if not is_adapter_dir(path_or_id) or any((p / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return path_or_id
    return json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or path_or_id


def torch_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def load_causal_lm(path_or_id: str, *, bf16: bool = False, trust_remote_code: bool = False,
                   field: str = "model_name_or_path"):
    from transformers import AutoModelForCausalLM

    _check_exists(path_or_id, field)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path_or_id, dtype=torch_dtype(bf16), trust_remote_code=trust_remote_code,
            use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot load a causal LM from {path_or_id!r}: {exc}") from exc


def load_reward_model(path_or_id: str, *, pad_token_id: int, bf16: bool = False,
                      trust_remote_code: bool = False, field: str = "model_name_or_path"):
    """AutoModelForSequenceClassification(num_labels=1) from a causal-LM or reward-model dir."""
    from transformers import AutoModelForSequenceClassification

    _check_exists(path_or_id, field)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path_or_id, num_labels=1, dtype=torch_dtype(bf16),
            trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot load a reward model from {path_or_id!r}: {exc}") from exc
    model.config.pad_token_id = pad_token_id
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (TRL's `disable_dropout`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
