"""The embedded tiny model: a Llama-architecture causal LM and a byte-level BPE tokenizer,
built fully offline from a config and a tokenizer trained on a given corpus (the demo
passes its task's text: `rayalign.demo.task.build_demo_model`).

The result is an ordinary Hugging Face directory (`save_pretrained`): everything else in
rayalign loads it with `from_pretrained(path)` like any hub model. head_dim is 32 because
vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# Assistant turns end with the eos token, so a chat-formatted completion stops on eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(corpus: Sequence[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `corpus` (and the chat template's role tags),
    with special tokens and a chat template, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = list(corpus) + ["<|user|>\n", "<|assistant|>\n", "<|system|>\n"] * 50
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_model(output_dir, corpus: Sequence[str], *, seed: int = 0, vocab_size: int = 320,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 256,
                     max_position_embeddings: int = 256, tie_word_embeddings: bool = True) -> Path:
    """Build and save the tiny model + tokenizer (trained on `corpus`) + generation config
    into `output_dir`; `seed` initialises the weights."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6,
        initializer_range=0.05,
    )
    if config.head_dim < 32:
        raise ValueError(f"head_dim={config.head_dim}: vLLM's CPU attention needs >= 32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=16, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
