"""Plain Hugging Face generation for small prompt sets (eval tables, demo correctness)."""

from __future__ import annotations

import torch


def left_padded(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id prompts, left-padded to the longest: what HF
    `generate` continues from (HF rollout engine and eval tables alike)."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_texts(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                   batch_size: int = 32, do_sample: bool = False) -> list[str]:
    """Greedy (or sampled) completions for token-id prompts, left-padded, decoded without
    special tokens. `model` is an HF model (or a DeepSpeed engine's module)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = left_padded(prompt_ids[start:start + batch_size], pad)
        width = ids.shape[1]
        device = next(model.parameters()).device
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out.extend(tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True))
    if was_training:
        model.train()
    return out
