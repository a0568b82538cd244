"""Log-prob module: selective log-softmax, masking, packed == padded, LD-DPO, WPO, PEFT."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayalign.batch import PreferenceBatch
from rayalign.losses import wpo_weights
from rayalign.models.logprobs import batch_logprobs, preference_logprobs, selective_log_softmax, sequence_logprobs

ROWS = [
    {"prompt_ids": [3, 5, 6, 7], "chosen_ids": [8, 9, 1], "rejected_ids": [10, 1]},
    {"prompt_ids": [3, 5], "chosen_ids": [8, 9, 11, 12, 1], "rejected_ids": [13, 14, 15, 1]},
    {"prompt_ids": [3, 5, 6, 7, 9, 9, 4], "chosen_ids": [20, 1], "rejected_ids": [21, 22, 23, 24, 25, 1]},
]


def model(tiny_model_dir):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m.eval()
    return m


def naive(m, batch):
    with torch.no_grad():
        logp = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.log_softmax(-1)
    tok = logp[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return tok * batch.completion_mask[:, 1:], logp


def test_selective_log_softmax_equals_log_softmax_gather():
    logits = torch.randn(3, 7, 50)
    index = torch.randint(0, 50, (3, 7))
    want = logits.log_softmax(-1).gather(-1, index[..., None]).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), want, atol=1e-6)


def test_summed_logps_equal_naive_and_respect_the_mask(tiny_model_dir):
    m = model(tiny_model_dir)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    per_token, _ = naive(m, batch)
    with torch.no_grad():
        out = preference_logprobs(m, batch)
    sums = per_token.sum(1)
    assert torch.allclose(out.chosen_logps, sums[:3], atol=1e-5)
    assert torch.allclose(out.rejected_logps, sums[3:], atol=1e-5)
    assert out.chosen_lengths.tolist() == [3, 5, 2] and out.rejected_lengths.tolist() == [2, 4, 6]


def test_packed_equals_padded_and_packing_really_isolates_sequences(tiny_model_dir):
    m = model(tiny_model_dir)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    with torch.no_grad():
        padded = preference_logprobs(m, batch)
        packed = preference_logprobs(m, batch, padding_free=True)
        assert torch.allclose(packed.chosen_logps, padded.chosen_logps, atol=1e-5)
        assert torch.allclose(packed.rejected_logps, padded.rejected_logps, atol=1e-5)
        # the same row without restarting positions (attention leaks across sequences) differs
        lengths = batch.attention_mask.sum(1).tolist()
        ids = torch.cat([batch.input_ids[i, :n] for i, n in enumerate(lengths)])[None]
        comp = torch.cat([batch.completion_mask[i, :n] for i, n in enumerate(lengths)])[None]
        leaky = sequence_logprobs(m, ids, torch.ones_like(ids), comp).per_token_logps
        assert not torch.allclose(leaky.sum(), packed.chosen_logps.sum() + packed.rejected_logps.sum(), atol=1e-3)


def test_ld_alpha_weights_the_tail_of_the_longer_completion(tiny_model_dir):
    m = model(tiny_model_dir)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    per_token, _ = naive(m, batch)
    with torch.no_grad():
        out = preference_logprobs(m, batch, ld_alpha=0.25)
    mask = batch.completion_mask[:, 1:]
    want = []
    for i in range(6):
        vals = per_token[i][mask[i].bool()]
        pair = i % 3
        shared = min(len(ROWS[pair]["chosen_ids"]), len(ROWS[pair]["rejected_ids"]))
        want.append(vals[:shared].sum() + 0.25 * vals[shared:].sum())
    want = torch.stack(want)
    assert torch.allclose(torch.cat([out.chosen_logps, out.rejected_logps]), want, atol=1e-5)


def test_wpo_weights_against_naive(tiny_model_dir):
    m = model(tiny_model_dir)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    per_token, logp = naive(m, batch)
    lssp = torch.logsumexp(2 * logp[:, :-1], dim=-1)
    want = wpo_weights(per_token, lssp, batch.completion_mask[:, 1:])
    with torch.no_grad():
        out = preference_logprobs(m, batch, use_weighting=True)
    assert torch.allclose(torch.cat([out.chosen_weights, out.rejected_weights]), want, atol=1e-5)


def _greedy_first_chosen(m, batch):
    """`batch` with chosen row 0's completion replaced by the model's greedy continuation."""
    ids = batch.input_ids.clone()
    with torch.no_grad():
        for t in batch.completion_mask[0].nonzero().flatten().tolist():
            ids[0, t] = m(input_ids=ids[:1, :t]).logits[0, -1].argmax()
    return PreferenceBatch(input_ids=ids, attention_mask=batch.attention_mask, completion_mask=batch.completion_mask)


@pytest.mark.parametrize("padding_free", [False, True])
def test_entropy_and_top1_equal_the_full_softmax_padded_and_packed(tiny_model_dir, padding_free):
    """Per-token entropy and argmax hits at completion positions (0 / False elsewhere), and the
    DPO metrics built from them: entropy over both halves, accuracy over chosen tokens."""
    m = model(tiny_model_dir)
    batch = _greedy_first_chosen(m, PreferenceBatch.from_rows(ROWS, pad_token_id=2))
    _, logp = naive(m, batch)
    logp = logp[:, :-1]
    mask = batch.completion_mask[:, 1:].bool()
    want_entropy = -(logp.exp() * logp).sum(-1) * mask
    want_top1 = (logp.argmax(-1) == batch.input_ids[:, 1:]) & mask
    with torch.no_grad():
        out = batch_logprobs(m, batch.input_ids, batch.attention_mask, batch.completion_mask,
                             padding_free=padding_free)
        pref = preference_logprobs(m, batch, padding_free=padding_free)
    assert torch.allclose(out.entropy[:, 1:], want_entropy, atol=1e-5) and not out.entropy[:, 0].any()
    assert torch.equal(out.is_top1[:, 1:], want_top1) and not out.is_top1[:, 0].any()
    assert want_top1[0].sum() == 3 and want_top1.sum() < mask.sum()  # the greedy row hits, not every token
    assert torch.allclose(pref.entropy, want_entropy.sum() / mask.sum(), atol=1e-6)
    assert pref.chosen_token_accuracy.item() == pytest.approx(want_top1[:3].sum().item() / mask[:3].sum().item())
    # the sums behind them, which learners pool (token counts: the completion lengths)
    assert torch.allclose(pref.entropy_sum, want_entropy.sum(), atol=1e-4)
    assert pref.chosen_top1_sum.item() == want_top1[:3].sum().item()
    assert pref.chosen_lengths.sum() == mask[:3].sum() and pref.rejected_lengths.sum() == mask[3:].sum()
    assert torch.allclose(pref.chosen_logits_sum / mask[:3].sum(), pref.chosen_mean_logits)
    assert torch.allclose(pref.rejected_logits_sum / mask[3:].sum(), pref.rejected_mean_logits)


def test_peft_lora_model_gives_gradients_only_to_the_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    out = preference_logprobs(m, batch)
    out.chosen_logps.sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)


class _NoPackedMask(torch.nn.Module):
    """A real model whose forward drops position ids, as architectures without packed-sequence
    masks effectively do: packed sequences would attend to each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_padding_free_default_packs_only_where_packing_gives_the_padded_numbers(tiny_model_dir):
    from rayalign.models.logprobs import packing_supported

    m = model(tiny_model_dir)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    assert packing_supported(m) is True  # Llama: transformers' mask honours packed position ids
    leaky = _NoPackedMask(m)
    assert packing_supported(leaky) is False
    with torch.no_grad():
        padded = preference_logprobs(m, batch, padding_free=False)
        for mdl in (m, leaky):  # the default (None) matches the padded numbers on both
            auto = preference_logprobs(mdl, batch)
            assert torch.allclose(auto.chosen_logps, padded.chosen_logps, atol=1e-5)
        forced = preference_logprobs(leaky, batch, padding_free=True)  # forcing it on the leaky model
        assert not torch.allclose(torch.cat([forced.chosen_logps, forced.rejected_logps]),
                                  torch.cat([padded.chosen_logps, padded.rejected_logps]), atol=1e-3)


def test_packing_fills_rows_no_longer_than_the_longest_sequence():
    """First-fit packing of the 6 sequences (lengths 7, 7, 9, 6, 6, 13) into rows of the longest
    (13): 4 rows, each sequence whole, at its own positions, none overlapping."""
    from rayalign.models.logprobs import _pack

    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    lengths = batch.attention_mask.sum(1).tolist()
    ids, comp, pos, placement = _pack(batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert ids.shape == (4, 13)  # fewer rows than the padded block, none wider
    seen = set()
    for i, (row, start, n) in enumerate(placement):
        assert n == lengths[i] and start + n <= ids.shape[1]
        assert torch.equal(ids[row, start:start + n], batch.input_ids[i, :n])
        assert pos[row, start:start + n].tolist() == list(range(n))
        assert comp[row, start] == 0  # never scored as the previous sequence's continuation
        cells = {(row, c) for c in range(start, start + n)}
        assert not cells & seen  # no two sequences overlap
        seen |= cells


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7 * 320])  # one chunk (probabilities kept) / 7-row chunks
def test_completion_only_chunked_head_gives_the_full_logits_numbers_and_gradients(tiny_model_dir, monkeypatch,
                                                                                 chunk_elements):
    """The lm_head applied to completion positions only, in row chunks rebuilt in backward,
    matches the full-logits path in values and in every parameter's gradient."""
    from rayalign.models import logprobs as lp

    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    results = {}
    for name, plain in (("chunked", lp.PLAIN_HEAD_MODEL_TYPES), ("full", frozenset())):
        m = model(tiny_model_dir)
        assert m.config.model_type == "llama"
        monkeypatch.setattr(lp, "PLAIN_HEAD_MODEL_TYPES", plain)
        monkeypatch.setattr(lp, "HEAD_CHUNK_ELEMENTS", chunk_elements)
        assert (lp._decoder_and_head(m) is not None) == (name == "chunked")
        out = preference_logprobs(m, batch, use_weighting=True)
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        results[name] = (out, {n: p.grad.clone() for n, p in m.named_parameters()})
    (a, ga), (b, gb) = results["chunked"], results["full"]
    for field in ("chosen_logps", "rejected_logps", "chosen_mean_logits", "chosen_weights", "entropy",
                  "chosen_token_accuracy"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), field
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for g in ga.values())


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7 * 320])
def test_token_stats_off_gives_the_same_log_probs_and_gradients(tiny_model_dir, monkeypatch, chunk_elements):
    """A reference's forward skips entropy and argmax; its log-probs and gradients are unchanged."""
    from rayalign.models import logprobs as lp

    monkeypatch.setattr(lp, "HEAD_CHUNK_ELEMENTS", chunk_elements)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=2)
    results = []
    for token_stats in (True, False):
        m = model(tiny_model_dir)
        out = preference_logprobs(m, batch, use_weighting=True, token_stats=token_stats)
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        results.append((out, [p.grad for p in m.parameters()]))
    (a, ga), (b, gb) = results
    assert b.entropy is None and b.chosen_token_accuracy is None and a.entropy is not None
    for field in ("chosen_logps", "rejected_logps", "chosen_mean_logits", "chosen_weights"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def _reward_model(tiny_model_dir, pad_token_id: int):
    from rayalign.models.loading import load_reward_model

    torch.manual_seed(0)
    m = load_reward_model(tiny_model_dir, pad_token_id=pad_token_id)
    with torch.no_grad():
        m.score.weight.normal_(0.0, 1.0)  # scores that differ from row to row
    return m


def _scores_and_grads(m, fn):
    m.zero_grad()
    scores = fn()
    scores.sum().backward()
    return scores.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pad", [2, 1])  # 1 also ends every sequence (pad == eos): the score is read before it
def test_packed_reward_scores_and_gradients_equal_the_models_own_forward(tiny_model_dir, pad):
    from rayalign.models.logprobs import score_packing_supported, sequence_scores

    m = _reward_model(tiny_model_dir, pad)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=pad)
    assert score_packing_supported(m) is True
    own, own_grads = _scores_and_grads(m, lambda: m(input_ids=batch.input_ids,
                                                    attention_mask=batch.attention_mask).logits)
    packed, packed_grads = _scores_and_grads(m, lambda: sequence_scores(m, batch.input_ids, batch.attention_mask,
                                                                        padding_free=True))
    assert own.shape == packed.shape == (6, 1) and own.std() > 0.1
    assert torch.allclose(packed, own, atol=1e-5, rtol=1e-5)
    assert own_grads.keys() == packed_grads.keys() and len(own_grads) > 10
    for name, g in own_grads.items():
        assert torch.allclose(packed_grads[name], g, atol=1e-5, rtol=1e-4), name


def test_reward_scores_of_a_batch_padded_with_another_id_take_the_models_own_forward(tiny_model_dir):
    from rayalign.models.logprobs import sequence_scores

    m = _reward_model(tiny_model_dir, 2)
    batch = PreferenceBatch.from_rows(ROWS, pad_token_id=0)  # the model pools at its pad id, 2
    with torch.no_grad():
        own = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert torch.equal(sequence_scores(m, batch.input_ids, batch.attention_mask, padding_free=True), own)
