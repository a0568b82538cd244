"""Model and tokenizer loading: everything goes through `from_pretrained(path_or_id)`.

Safe defaults: `trust_remote_code` is off unless the config asks, weights load from
safetensors only (`use_safetensors=True`), and a tokenizer without pad or eos is rejected
with an error naming the path before any training starts. `check_model_dir` reads only a
local model dir's small files (config.json, safetensors headers) so the drivers can refuse
a damaged or unusable dir before Ray starts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be used; the message names it."""


def _check_exists(path_or_id: str, field: str) -> None:
    # A path that looks local but does not exist is almost always a typo; hub ids have
    # exactly one slash and no leading "." or "/". An "org/name" whose "org" is a directory
    # here (outputs/sft-tiny before the SFT job ran) is a local path too: failing now saves
    # the hub client's retries, which take ~30 s offline.
    first = path_or_id.split("/", 1)[0]
    looks_local = (path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
                   or (path_or_id.count("/") == 1 and Path(first).is_dir()))
    if looks_local and not Path(path_or_id).expanduser().exists():
        raise ModelLoadError(f"{field}: path does not exist: {path_or_id}")


SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
CONVERT_HINT = ("rayalign loads safetensors only (a pickle checkpoint can run code when loaded). If you "
                "trust the file, convert it once: python -c \"import transformers as t; "
                "m = t.AutoModelForCausalLM.from_pretrained('DIR', use_safetensors=False); "
                "m.save_pretrained('DIR', safe_serialization=True)\" (for a PEFT adapter: "
                "PeftModel.save_pretrained(..., safe_serialization=True))")


def check_safetensors(path: Path, field: str) -> None:
    """Read one safetensors file's header (8-byte little-endian length, then JSON) and check
    the file holds all the tensor data the header describes; never reads the tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{field}: {path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelLoadError(f"{field}: {path} is truncated: its header claims {n} bytes but the file "
                                 f"has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{field}: {path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{field}: {path}: unreadable safetensors header (not a JSON object)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelLoadError(f"{field}: {path}: unreadable safetensors header (bad data_offsets)") from None
    if size < 8 + n + end:
        raise ModelLoadError(f"{field}: {path} is truncated: {size} bytes, the header describes "
                             f"{8 + n + end} (re-copy or re-download it)")


def _weight_files(p: Path, field: str, adapter: bool) -> list[Path]:
    """The safetensors files from_pretrained would read in dir `p`; refuses pickle-only dirs."""
    if adapter:
        files = [p / "adapter_model.safetensors"]
    elif (p / SAFETENSORS_INDEX).is_file():
        try:
            weight_map = json.loads((p / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{field}: {p / SAFETENSORS_INDEX}: unreadable index ({exc!r})") from None
        files = [p / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{field}: {p / SAFETENSORS_INDEX} names shards that are missing: {missing[:5]}")
        return files
    else:
        files = [p / "model.safetensors"]
    if files[0].is_file():
        return files
    pickles = [name for name in PICKLE_WEIGHTS if (p / name).is_file()] + sorted(
        f.name for f in p.glob("pytorch_model-*.bin"))
    if pickles:
        raise ModelLoadError(f"{field}: {p} holds only pickle weights ({', '.join(pickles[:3])}), no "
                             f"{files[0].name}. {CONVERT_HINT.replace('DIR', str(p))}")
    expected = "adapter_model.safetensors" if adapter else f"model.safetensors or {SAFETENSORS_INDEX} + shards"
    raise ModelLoadError(f"{field}: {p} holds no model weights (expected {expected})")


def _vocab_size(config: dict) -> int | None:
    for section in (config, config.get("text_config") or {}):
        if isinstance(section, dict) and isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


def check_model_dir(path_or_id: str, field: str, *, trust_remote_code: bool = False, tokenizer=None,
                    tokenizer_field: str = "tokenizer_name_or_path") -> None:
    """Refuse a local model dir that from_pretrained would fail on (or load wrongly) later, in
    an actor: no config.json, custom code (`auto_map`) without trust_remote_code, pickle-only
    or truncated weights, or a `tokenizer` with more tokens than the model's embedding. A
    PEFT adapter dir is checked with its base model. Hub ids are left to from_pretrained."""
    _check_exists(path_or_id, field)
    p = Path(path_or_id).expanduser()
    if not p.is_dir():
        return
    adapter = (p / "adapter_config.json").is_file()
    meta = p / ("adapter_config.json" if adapter else "config.json")
    if not meta.is_file():
        raise ModelLoadError(f"{field}: {p} is not a model dir: it has no config.json")
    try:
        config = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{field}: {meta}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{field}: {meta}: expected a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(f"{field}: {meta} has auto_map (the model needs its own Python code, "
                             f"{sorted(config['auto_map'])}); set trust_remote_code=true if you trust {p}")
    for f in _weight_files(p, field, adapter):
        check_safetensors(f, field)
    if adapter:
        base = config.get("base_model_name_or_path")
        if base:
            check_model_dir(base, f"{field} (base_model_name_or_path of the adapter)",
                            trust_remote_code=trust_remote_code, tokenizer=tokenizer, tokenizer_field=tokenizer_field)
        return
    vocab = _vocab_size(config)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ModelLoadError(f"{tokenizer_field}: the tokenizer has {len(tokenizer)} tokens but {field}={p} "
                             f"embeds only vocab_size={vocab}: ids >= {vocab} would index past the embedding "
                             "(use the model's own tokenizer, or resize the embedding and save the model)")


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


def adapter_base(adapter_dir: str) -> str | None:
    """`base_model_name_or_path` of a PEFT adapter dir's adapter_config.json (None if unset)."""
    import json

    return json.loads((Path(adapter_dir).expanduser() / "adapter_config.json").read_text()).get(
        "base_model_name_or_path") or None


def _tokenizer_source(path_or_id: str) -> str:
    from rayalign.config import is_adapter_dir

    p = Path(path_or_id).expanduser()
    if not is_adapter_dir(path_or_id) or any((p / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return path_or_id
    return adapter_base(path_or_id) or path_or_id


def torch_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def _from_pretrained_kwargs(bf16: bool, trust_remote_code: bool, init_kwargs: dict | None) -> dict:
    """from_pretrained's keyword arguments: the job's dtype, then TRL's model_init_kwargs
    (dtype, attn_implementation, revision, ...) over it; a dtype name becomes a torch dtype."""
    kwargs = {"dtype": torch_dtype(bf16), "trust_remote_code": trust_remote_code, "use_safetensors": True}
    extra = dict(init_kwargs or {})
    if "torch_dtype" in extra:
        extra["dtype"] = extra.pop("torch_dtype")
    if isinstance(extra.get("dtype"), str) and extra["dtype"] != "auto":
        extra["dtype"] = getattr(torch, extra["dtype"])
    return {**kwargs, **{k: v for k, v in extra.items() if v is not None}}


def load_causal_lm(path_or_id: str, *, bf16: bool = False, trust_remote_code: bool = False,
                   field: str = "model_name_or_path", init_kwargs: dict | None = None):
    from transformers import AutoModelForCausalLM

    _check_exists(path_or_id, field)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path_or_id, **_from_pretrained_kwargs(bf16, trust_remote_code, init_kwargs))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot load a causal LM from {path_or_id!r}: {exc}") from exc


def load_reward_model(path_or_id: str, *, pad_token_id: int, bf16: bool = False,
                      trust_remote_code: bool = False, field: str = "model_name_or_path",
                      init_kwargs: dict | None = None):
    """AutoModelForSequenceClassification(num_labels=1) from a causal-LM or reward-model dir."""
    from transformers import AutoModelForSequenceClassification

    _check_exists(path_or_id, field)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path_or_id, num_labels=1, **_from_pretrained_kwargs(bf16, trust_remote_code, init_kwargs))
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
