"""The embedded tiny model: offline, deterministic, loadable by every Auto class."""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rayalign.demo.task import build_demo_model


def test_reloads_with_all_auto_classes(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 1e6
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    ids = tok(["Reverse: a b ->"], return_tensors="pt")["input_ids"]
    assert rm(input_ids=ids).logits.shape == (1, 1)
    text = tok.apply_chat_template([{"role": "user", "content": "Reverse: a b ->"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    assert tok.decode(tok("Reverse: c a f ->")["input_ids"]) == "Reverse: c a f ->"


def test_deterministic(tmp_path, tiny_model_dir):
    again = build_demo_model(tmp_path / "again", seed=0)
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == open(f"{tiny_model_dir}/tokenizer.json").read()
