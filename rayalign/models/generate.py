"""Plain Hugging Face generation for small prompt sets (eval tables, demo correctness)."""

from __future__ import annotations

import torch


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
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        device = next(model.parameters()).device
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out.extend(tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True))
    if was_training:
        model.train()
    return out
