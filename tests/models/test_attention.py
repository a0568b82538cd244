"""Packed rows attend one sequence at a time (rayalign.models.attention): one row per batch,
no block-diagonal mask, and the padded forward's numbers and gradients."""

import json

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rayalign.batch import PreferenceBatch
from rayalign.models import attention
from rayalign.models import logprobs as lp

ROWS = [
    {"prompt_ids": [3, 5, 6, 7], "chosen_ids": [8, 9, 1], "rejected_ids": [10, 1]},
    {"prompt_ids": [3, 5], "chosen_ids": [8, 9, 11, 12, 1], "rejected_ids": [13, 14, 15, 1]},
    {"prompt_ids": [3, 5, 6, 7, 9, 9, 4], "chosen_ids": [20, 1], "rejected_ids": [21, 22, 23, 24, 25, 1]},
]


@pytest.fixture(autouse=True)
def segment_short_batches(monkeypatch):
    """These rows are short (at most 13 tokens): let them take the per-sequence path."""
    monkeypatch.setattr(lp, "SEGMENT_MIN_TOKENS", 1)


def _logps_and_grads(m, batch, padding_free):
    m.zero_grad()
    out = lp.preference_logprobs(m, batch, padding_free=padding_free)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for field in ("chosen_logps", "rejected_logps", "entropy", "chosen_token_accuracy"):
        assert torch.allclose(getattr(out_a, field), getattr(out_b, field), atol=1e-5), field
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4), n


def _gqa_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("which", ["tiny", "gqa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_batch_is_one_row_attended_per_sequence_with_the_padded_numbers_and_gradients(
        tiny_model_dir, which, checkpointing):
    def load():
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir) if which == "tiny" else _gqa_llama()
        if checkpointing:  # the recomputed forward in backward must attend per sequence too
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        return m

    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    padded = _logps_and_grads(load(), batch, padding_free=False)
    m = load()
    assert m.config._attn_implementation == "sdpa"
    packed = _logps_and_grads(m, batch, padding_free=True)
    assert m.config._attn_implementation == attention.NAME and lp._segmented(m, batch.attention_mask)
    _assert_same(packed, padded)
    ids, _, _, placement = lp._pack(batch.input_ids, batch.attention_mask, batch.completion_mask, one_row=True)
    assert ids.shape == (1, int(batch.attention_mask.sum()))  # every real token, no padding
    assert attention.row_segments(placement, *ids.shape) == [[(0, 13), (13, 9), (22, 7), (29, 7), (36, 6), (42, 6)]]
    # the padded forward of the switched model is unchanged (sdpa with its mask)
    _assert_same(_logps_and_grads(m, batch, padding_free=False), padded)


def test_a_segmented_forward_builds_no_mask_and_unpacked_ones_keep_theirs(tiny_model_dir, monkeypatch):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    with torch.no_grad():
        lp.preference_logprobs(m, batch, padding_free=True)  # switches the model
        calls = []

        def spy(module, q, k, v, mask, **kwargs):
            calls.append((mask is None, kwargs.get(attention.SEGMENTS) is not None))
            return attention.packed_sdpa(module, q, k, v, mask, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, spy)
        lp.preference_logprobs(m, batch, padding_free=True)
        assert calls and set(calls) == {(True, True)}
        calls.clear()
        lp.preference_logprobs(m, batch, padding_free=False)
        assert calls and set(calls) == {(False, False)}
        calls.clear()
        with attention.segment_forward():  # spans missing where no mask was built: an error, not a leak
            with pytest.raises(RuntimeError, match="without its rayalign_segments"):
                m(input_ids=batch.input_ids[:1, :5], use_cache=False)


def test_sliding_window_models_keep_masked_packing(tiny_model_dir):
    """A sliding window is not a span's causal square: such a model is not switched, and its
    packed rows keep transformers' mask (rows no longer than the longest sequence)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    cfg._attn_implementation = "sdpa"
    m = MistralForCausalLM(cfg).eval()
    assert not attention.use_packed_attention(m, lp.PLAIN_HEAD_MODEL_TYPES)
    assert m.config._attn_implementation == "sdpa"
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    with torch.no_grad():
        a = lp.preference_logprobs(m, batch, padding_free=True)
        b = lp.preference_logprobs(m, batch, padding_free=False)
    assert torch.allclose(a.chosen_logps, b.chosen_logps, atol=1e-5)


def test_the_switch_is_not_saved_with_the_model(tiny_model_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert attention.use_packed_attention(m, lp.PLAIN_HEAD_MODEL_TYPES)
    m.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_short_batches_keep_the_masked_rows_and_the_probe_checks_both_paths(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(lp, "SEGMENT_MIN_TOKENS", 14)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)  # longest sequence: 13 tokens
    assert lp.packing_supported(m)  # the probe ran the per-sequence path too: the model is switched
    assert m.config._attn_implementation == attention.NAME
    assert not lp._segmented(m, batch.attention_mask) and lp._segmented(m, batch.attention_mask, force=True)
    longer = PreferenceBatch.from_rows(ROWS + [{"prompt_ids": [3] * 10, "chosen_ids": [8] * 4, "rejected_ids": [9]}],
                                       pad_token_id=2)
    assert lp._segmented(m, longer.attention_mask)  # 14 tokens
