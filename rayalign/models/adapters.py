"""PEFT LoRA policies: a fresh adapter or one loaded from an adapter dir, an optional frozen
copy of it as the reference (two adapters in one model), and saving only the trained one.

A PEFT adapter dir (`adapter_config.json` + `adapter_model.safetensors`) names its base model
in `base_model_name_or_path`. As a policy it is loaded trainable on that base; as a frozen
reference model (Reference actor, precompute stage) it is loaded and merged into the base.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil

import torch

from rayalign.config import is_adapter_dir
from rayalign.models.loading import ModelLoadError, adapter_base, load_causal_lm


def adapter_base_model(adapter_dir: str, field: str = "model_name_or_path") -> str:
    """The base model an adapter dir was trained on (its adapter_config.json)."""
    base = adapter_base(adapter_dir)
    if not base:
        raise ModelLoadError(f"{field}: {adapter_dir}/adapter_config.json names no base_model_name_or_path")
    return base


def load_merged_adapter(adapter_dir: str, *, bf16: bool = False, trust_remote_code: bool = False,
                        field: str = "model_name_or_path") -> torch.nn.Module:
    """Base model + adapter merged into plain weights (base-model parameter names): a frozen
    reference needs no adapter machinery, and TR-DPO mixes by those names."""
    from peft import PeftModel

    base = load_causal_lm(adapter_base_model(adapter_dir, field), bf16=bf16, trust_remote_code=trust_remote_code,
                          field=f"{field} (adapter base model)")
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def wrap_policy(model: torch.nn.Module, cfg, task) -> torch.nn.Module:
    """The LoRA policy around `model` (the base): the adapter dir `cfg.model_name_or_path`
    loaded trainable, or a fresh adapter from `cfg.lora`, under `model_adapter_name`; with
    `ref_adapter_name` set, a frozen copy of that starting adapter is added under that name.
    The trained adapter is left active."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = trained_adapter_name(cfg)
    ref = getattr(cfg, "ref_adapter_name", None)
    if is_adapter_dir(cfg.model_name_or_path):
        model = PeftModel.from_pretrained(model, cfg.model_name_or_path, adapter_name=name, is_trainable=True)
        if ref is not None:  # the same files a second time, frozen
            model.load_adapter(cfg.model_name_or_path, adapter_name=ref, is_trainable=False)
    else:
        lc = cfg.lora
        modules = lc.target_modules
        modules = "all-linear" if modules == ("all-linear",) else None if modules is None else list(modules)
        peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                              target_modules=modules, task_type=task)
        model = get_peft_model(model, peft_cfg, adapter_name=name)
        if ref is not None:  # a fresh adapter's copy: lora_B is 0, so it equals the base model
            ref_cfg = copy.deepcopy(model.peft_config[name])
            ref_cfg.inference_mode = True
            model.add_adapter(ref, ref_cfg)
            set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=name), adapter_name=ref)
    model.set_adapter(name)
    if ref is not None:
        leaked = [n for n, p in model.named_parameters() if p.requires_grad and f".{ref}." in n]
        if leaked:
            raise RuntimeError(f"reference adapter {ref!r} has trainable parameters: {leaked[:3]}")
    return model


def trained_adapter_name(cfg) -> str:
    """The trained adapter's name (configs without the field use PEFT's "default")."""
    return getattr(cfg, "model_adapter_name", "default")


@contextlib.contextmanager
def reference_weights(module: torch.nn.Module, cfg):
    """Inside: `module` computes as the reference in implicit mode (adapter disabled) or
    adapter mode (the frozen `ref_adapter_name` active), in eval mode (no dropout, like a
    separate reference model). On exit the trained adapter is active again: weight export
    merges the active adapter and only it may require grad."""
    mode = cfg.reference_mode
    was_training = module.training
    module.eval()
    try:
        if mode == "implicit":
            with module.disable_adapter():
                yield module
        elif mode == "adapter":
            module.set_adapter(cfg.ref_adapter_name, inference_mode=True)
            try:
                yield module
            finally:
                module.set_adapter(trained_adapter_name(cfg))
        else:
            raise ValueError(f"reference_weights: reference mode {mode!r} does not use the policy's weights")
    finally:
        module.train(was_training)


def save_trained_adapter(module: torch.nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None,
                         cfg) -> None:
    """Write only the trained adapter (adapter_model.safetensors + adapter_config.json) into
    `directory` itself, whatever its name; a frozen reference adapter is never saved."""
    name = trained_adapter_name(cfg)
    ref = getattr(cfg, "ref_adapter_name", None)
    if state_dict is not None and ref is not None:
        # PEFT picks an adapter's keys by substring: drop the reference's outright.
        state_dict = {k: v for k, v in state_dict.items() if f".{ref}." not in k}
    module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, selected_adapters=[name])
    if name != "default":  # PEFT writes every other name into a subdirectory
        sub = os.path.join(directory, name)
        for f in os.listdir(sub):
            os.replace(os.path.join(sub, f), os.path.join(directory, f))
        shutil.rmtree(sub)
