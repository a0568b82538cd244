"""Sequence log-probs of completions: one forward, completion tokens only, memory-lean.

Per-token log-probs are aligned with the *unshifted* sequence: `per_token[:, t]` is
log p(x_t | x_<t) where token t is a completion token, 0 elsewhere — so the completion
mask of a batch masks them directly. Log-softmax is evaluated only at completion positions
and in row chunks, never over the whole (N, L, V) block. The packed path puts a batch's
sequences into as few rows as hold them (none longer than the longest sequence) with
restarting position ids (transformers turns that into a block-diagonal causal mask), which
gives the same numbers as the padded path; it is the default wherever a model is found to
honour it (`packing_supported`). Reward models (`sequence_scores`) pack the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rayalign.batch import PreferenceBatch, SequenceBatch
from rayalign.models.attention import SEGMENTS, row_segments, segment_forward, use_packed_attention

CHUNK_ROWS = 1024  # completion positions whose log-softmax is evaluated at once


@dataclass
class LogProbs:
    """Per-sequence completion statistics of one forward pass."""

    per_token_logps: torch.Tensor  # (N, L), 0 outside the completion
    sum_logps: torch.Tensor  # (N,) token-summed
    num_tokens: torch.Tensor  # (N,) completion token counts
    mean_logits: torch.Tensor  # (N, L) vocabulary-mean logit per completion position, 0 elsewhere
    log_sum_sq_probs: torch.Tensor | None = None  # (N, L) log sum_v p_v^2 (WPO), when asked
    # token_stats (the default): entropy of the next-token distribution (0 outside the completion)
    # and whether the token is its first argmax (False outside), both (N, L)
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None

    @property
    def mean_logps(self) -> torch.Tensor:
        return self.sum_logps / self.num_tokens.clamp(min=1)


@dataclass
class PreferenceLogProbs:
    """Chosen/rejected halves of a `PreferenceBatch` forward."""

    chosen_logps: torch.Tensor  # (B,) summed (LD-weighted when ld_alpha is set)
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor  # (B,) completion token counts
    rejected_lengths: torch.Tensor
    chosen_mean_logits: torch.Tensor  # scalar: token-weighted mean logit over chosen completions
    rejected_mean_logits: torch.Tensor
    chosen_per_token_logps: torch.Tensor  # (B, L)
    chosen_weights: torch.Tensor | None = None  # WPO sequence weights
    rejected_weights: torch.Tensor | None = None
    # token_stats (the default): scalar token-weighted mean entropy over chosen and rejected
    # completions, and the share of chosen completion tokens that are the argmax
    entropy: torch.Tensor | None = None
    chosen_token_accuracy: torch.Tensor | None = None
    # The sums behind those token means (counts: chosen_lengths / rejected_lengths summed), which
    # TRL adds up across processes before it divides: logits, entropy (None without token_stats)
    # and argmax hits over chosen completion tokens.
    chosen_logits_sum: torch.Tensor | None = None
    rejected_logits_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    chosen_top1_sum: torch.Tensor | None = None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] for rows of `logits` (..., V), chunked over rows so no
    full log-softmax tensor is materialised."""
    flat = logits.reshape(-1, logits.shape[-1])
    idx = index.reshape(-1)
    out = []
    for start in range(0, flat.shape[0], CHUNK_ROWS):
        rows = flat[start:start + CHUNK_ROWS]
        picked = rows.gather(-1, idx[start:start + CHUNK_ROWS, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    if not out:
        return flat.new_zeros(index.shape)
    return torch.cat(out).reshape(index.shape)


@torch.no_grad()
def _softmax_stats(logits: torch.Tensor, targets: torch.Tensor, *, stats: bool, consume: bool):
    """One exp pass over (K, V) fp32 logits z: (lse, e = exp(z - max) with row sums `total`,
    and when `stats`: entropy lse - sum_v p_v z_v, whether the target is the first argmax).
    torch.max returns the first maximum, so a tie with an earlier token is no hit, as in TRL's
    `is_top1`. `consume`: the logits are overwritten (with e * z), no second (K, V) block made."""
    top, first = logits.max(dim=-1) if stats else (logits.amax(dim=-1), None)
    e = (logits - top[:, None]).exp_()
    total = e.sum(dim=-1)
    lse = top + total.log()  # what torch.logsumexp computes
    if not stats:
        return lse, e, total, None, None
    weighted = logits.mul_(e) if consume else logits * e
    return lse, e, total, lse - weighted.sum(dim=-1) / total, first == targets


# Architectures whose causal-LM logits are exactly lm_head(decoder(x)): no logit soft-capping
# or scaling after the head. For these the head runs on completion positions only, in chunks.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "starcoder2"})
HEAD_CHUNK_ELEMENTS = 1 << 24  # logits (rows x vocabulary) held at once by the chunked head: 64 MiB fp32


def _base_module(model):
    """The transformers model inside a DeepSpeed engine and/or a PEFT wrapper."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    if hasattr(module, "get_base_model"):  # PEFT: LoRA layers are injected in place
        module = module.get_base_model()
    return module


def _decoder_and_head(model):
    """(decoder, lm_head) when the completion-only head applies, else None: a plain-head
    architecture, an unwrapped nn.Linear head (not a LoRA layer), parameters not partitioned
    by ZeRO-3 (a ZeRO-3 forward gathers them in the model's own hooks), and a forward that is
    the class's own."""
    module = _base_module(model)
    config = getattr(module, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if "forward" in vars(module):  # forward wrapped on the instance (accelerate autocast, ...): keep it
        return None
    try:
        decoder, head = module.get_decoder(), module.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not torch.nn.Linear or decoder is None or hasattr(head.weight, "ds_id"):
        return None
    return decoder, head


class _CompletionHead(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for K hidden rows, with the (K, V) logits built a chunk
    of rows at a time: forward keeps only per-row log-normalisers, backward rebuilds each
    chunk's logits (unless everything fit in one chunk, whose probabilities are kept).
    Also returns, without gradient, each row's vocabulary-mean logit and, when asked, its
    entropy and whether the target is the argmax (`with_stats`) and log sum_v p_v^2 (WPO);
    an empty tensor for each output not asked for."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, with_log_sum_sq: bool, with_stats: bool):
        k = hidden.shape[0]
        logps = torch.empty(k, dtype=torch.float32, device=hidden.device)
        means, lse_all = torch.empty_like(logps), torch.empty_like(logps)
        entropy = torch.empty(k if with_stats else 0, dtype=torch.float32, device=hidden.device)
        top1 = torch.empty(k if with_stats else 0, dtype=torch.bool, device=hidden.device)
        lssp = torch.empty_like(logps) if with_log_sum_sq else None
        probs = None
        for start in range(0, k, chunk):
            sl = slice(start, start + chunk)
            logits = torch.nn.functional.linear(hidden[sl], weight, bias).float()
            target_logits = logits.gather(-1, targets[sl, None]).squeeze(-1)
            means[sl] = logits.mean(dim=-1)
            if with_log_sum_sq:
                lssp[sl] = torch.logsumexp(2 * logits, dim=-1)
            # The exp pass of the log-normaliser also gives the entropy; it overwrites the logits.
            lse, e, total, chunk_entropy, chunk_top1 = _softmax_stats(logits, targets[sl], stats=with_stats,
                                                                     consume=True)
            if with_stats:
                entropy[sl], top1[sl] = chunk_entropy, chunk_top1
            lse_all[sl] = lse
            logps[sl] = target_logits - lse
            if with_log_sum_sq:
                lssp[sl] -= 2 * lse
            if k <= chunk:
                probs = e.div_(total[:, None])
        ctx.chunk = chunk
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias if bias is not None else weight.new_empty(0), targets,
                              lse_all, probs if probs is not None else lse_all.new_empty(0))
        ctx.mark_non_differentiable(means, entropy, top1)
        if lssp is None:
            return logps, means, entropy, top1, means.new_empty(0)
        ctx.mark_non_differentiable(lssp)
        return logps, means, entropy, top1, lssp

    @staticmethod
    def backward(ctx, grad_logps, _grad_means, _grad_entropy, _grad_top1, _grad_lssp):
        hidden, weight, bias, targets, lse_all, probs = ctx.saved_tensors
        chunk, k = ctx.chunk, hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        for start in range(0, k, chunk):
            sl = slice(start, start + chunk)
            if probs.numel():
                p = probs
            else:
                logits = torch.nn.functional.linear(hidden[sl], weight, bias if ctx.has_bias else None).float()
                p = (logits - lse_all[sl, None]).exp_()
            g = grad_logps[sl].float()
            # d logp / d logits = onehot(target) - softmax
            grad_logits = p.mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[sl, None], g[:, None])
            if grad_hidden is not None:
                grad_hidden[sl] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ hidden[sl].float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(weight.dtype), None, None, None, None)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      completion_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      with_log_sum_sq: bool = False, token_stats: bool = True,
                      attention_kwargs: dict | None = None) -> LogProbs:
    """Forward `model` once and score the completion tokens of each row. Where the model's
    logits are lm_head(decoder(x)) (`_decoder_and_head`) the head runs on the completion
    positions only, in row chunks, so no (rows x positions x vocabulary) block exists.
    `token_stats`: also each position's entropy and argmax hit (a reference needs neither).
    `attention_kwargs`: passed to the forward (packed rows' spans, `_packed_forward`)."""
    kwargs = {"input_ids": input_ids, "use_cache": False, **(attention_kwargs or {})}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    # Token t is predicted by the logits at t-1; position 0 is never a completion target.
    target_mask = completion_mask.clone().bool()
    target_mask[:, 0] = False
    rows, cols = target_mask.nonzero(as_tuple=True)
    targets = input_ids[rows, cols]
    parts = _decoder_and_head(model)
    lssp_rows = None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**kwargs).last_hidden_state[rows, cols - 1]  # (K, H)
        chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
        token_logps, mean_rows, entropy_rows, top1_rows, lssp_rows = _CompletionHead.apply(
            hidden, head.weight, head.bias, targets, chunk, with_log_sum_sq, token_stats)
    else:
        logits = model(**kwargs).logits
        picked = logits[rows, cols - 1].float()  # (K, V): completion positions only
        token_logps = selective_log_softmax(picked, targets)
        with torch.no_grad():
            detached = picked.detach()
            mean_rows = detached.mean(dim=-1)
            if token_stats:
                stats = [_softmax_stats(z, t, stats=True, consume=False)[3:]  # split: one (0, V) part if K = 0
                         for z, t in zip(detached.split(CHUNK_ROWS), targets.split(CHUNK_ROWS))]
                entropy_rows, top1_rows = (torch.cat(parts) for parts in zip(*stats))
            if with_log_sum_sq:
                lssp_rows = torch.logsumexp(2 * picked, dim=-1) - 2 * torch.logsumexp(picked, dim=-1)
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    per_token = zeros.index_put((rows, cols), token_logps)
    mean_logits = zeros.index_put((rows, cols), mean_rows.detach())
    entropy = zeros.index_put((rows, cols), entropy_rows) if token_stats else None
    is_top1 = torch.zeros_like(target_mask).index_put((rows, cols), top1_rows) if token_stats else None
    lssp = None if not with_log_sum_sq else zeros.index_put((rows, cols), lssp_rows.detach())
    mask = target_mask.to(per_token.dtype)
    return LogProbs(per_token_logps=per_token, sum_logps=per_token.sum(dim=1), num_tokens=mask.sum(dim=1),
                    mean_logits=mean_logits, entropy=entropy, is_top1=is_top1, log_sum_sq_probs=lssp)


def _pack(input_ids, attention_mask, completion_mask, one_row: bool = False):
    """The rows' real tokens packed into as few rows as hold them, none longer than the longest
    sequence (first-fit, longest first), position ids restarting per sequence. Attention then
    costs at most what the padded block's does (sdpa attends over a whole row, so one row of
    everything would cost the square of the total). `one_row`: every sequence in a single row,
    no padding at all (for attention that runs per sequence, `rayalign.models.attention`).
    Returns (ids, completion mask, position ids, placement: (row, start, length) per input row)."""
    lengths = attention_mask.sum(dim=1).tolist()
    width = sum(lengths) if one_row else max(lengths)
    free: list[int] = []  # room left in each packed row
    placement: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        placement[i] = (row, width - free[row], n)
        free[row] -= n
    rows = len(free)
    ids = input_ids.new_zeros((rows, width))
    comp = completion_mask.new_zeros((rows, width))
    # Unused tail positions count up from 0 as one more (unscored) sequence of their row.
    pos = torch.arange(width, device=input_ids.device).repeat(rows, 1)
    for i, (row, start, n) in enumerate(placement):
        ids[row, start:start + n] = input_ids[i, :n]
        comp[row, start:start + n] = completion_mask[i, :n]
        comp[row, start] = 0  # a sequence's first token is never predicted by the one before it
        pos[row, start:start + n] = torch.arange(n, device=input_ids.device)
    for row, room in enumerate(free):
        if room:
            pos[row, width - room:] = torch.arange(room, device=input_ids.device)
    return ids, comp, pos, placement


# Batches whose longest sequence is shorter stay on the masked rows: there the per-sequence sdpa
# calls cost more than the masked blocks they save (the tiny demo model at max_length 64).
SEGMENT_MIN_TOKENS = 128


def _segmented(model, attention_mask, force: bool = False) -> bool:
    """Whether this batch's attention runs per packed sequence (`rayalign.models.attention`): then
    it packs into one row and no block-diagonal mask is built. `force`: whatever its lengths (the
    packing probe's short sequences, so that the path long batches take is the one checked)."""
    if not force and int(attention_mask.sum(dim=1).max()) < SEGMENT_MIN_TOKENS:
        return False
    return use_packed_attention(_base_module(model), PLAIN_HEAD_MODEL_TYPES)


@contextmanager
def _packed_forward(model, input_ids, attention_mask, completion_mask, segments: bool = False):
    """A packed forward's set-up: yields `_pack`'s (ids, completion mask, position ids, placement)
    and the forward's extra kwargs (the rows' spans where attention runs per sequence, in one row;
    no mask is built inside), masked rows otherwise. `segments`: as `_segmented`'s `force`."""
    segmented = _segmented(model, attention_mask, force=segments)
    ids, comp, pos, placement = _pack(input_ids, attention_mask, completion_mask, one_row=segmented)
    kwargs = {SEGMENTS: row_segments(placement, *ids.shape)} if segmented else {}
    with segment_forward(segmented):
        yield ids, comp, pos, placement, kwargs


def _unpack(packed: torch.Tensor, placement: list[tuple[int, int, int]], width: int) -> torch.Tensor:
    out = packed.new_zeros((len(placement), width))
    for i, (row, start, n) in enumerate(placement):
        out[i, :n] = packed[row, start:start + n]
    return out


_PACKING_ATTR = "_rayalign_packing_supported"
_SCORE_PACKING_ATTR = "_rayalign_score_packing_supported"


@torch.no_grad()
def _probe_packing(model, attr: str, padded, packed, avoid: int | None = None) -> bool:
    """`padded(model, ids, mask)` vs both packed paths, `packed(model, ids, mask, segments)` with
    segments False (masked rows: the 4 and the 3 share a row) and True (one row attended per
    sequence, the path long batches take), on three short probe sequences; decided once per
    model, remembered on it as `attr`. `avoid`: a token id the probe must not contain (a reward
    model's pad id ends its score)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    known = getattr(module, attr, None)
    if known is not None:
        return known
    vocab = module.get_input_embeddings().num_embeddings
    lengths = [3, 4, 7]
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = (torch.arange(n) * 7 + 3 + i) % vocab
        attn[i, :n] = 1
    if avoid is not None:
        ids[ids == avoid] = (avoid + 1) % vocab
        ids[attn == 0] = avoid
    device = _device(module)
    ids, attn = ids.to(device), attn.to(device)
    was_training = module.training
    module.eval()
    try:
        want = padded(model, ids, attn)
        supported = all(got is not None and bool(torch.allclose(want, got, atol=1e-4, rtol=1e-4))
                        for got in (packed(model, ids, attn, segments) for segments in (False, True)))
    except (RuntimeError, ValueError, TypeError):  # a forward that rejects position_ids without a mask
        supported = False
    finally:
        module.train(was_training)
    setattr(module, attr, supported)
    return supported


def packing_supported(model) -> bool:
    """Whether `model` scores packed sequences (shared rows, restarting position ids) exactly as
    padded ones: true for architectures whose attention mask honours packed position ids
    (transformers' `create_causal_mask`: Llama, Qwen2/3, Mistral, Gemma, ...), false where
    attention leaks across the packed sequences."""
    return _probe_packing(
        model, _PACKING_ATTR,
        lambda m, ids, attn: _padded_logprobs(m, ids, attn, attn, False).per_token_logps,
        lambda m, ids, attn, segments: _packed_logprobs(m, ids, attn, attn, False, segments=segments).per_token_logps)


def batch_logprobs(model, input_ids, attention_mask, completion_mask, *, padding_free: bool | None = None,
                   with_log_sum_sq: bool = False, token_stats: bool = True) -> LogProbs:
    """`sequence_logprobs` on a right-padded block, through the packed path when
    `padding_free` is true, or is None (the default) and the model packs exactly
    (`packing_supported`)."""
    if padding_free is None:
        padding_free = packing_supported(model)
    if padding_free:
        return _packed_logprobs(model, input_ids, attention_mask, completion_mask, with_log_sum_sq,
                                token_stats=token_stats)
    return _padded_logprobs(model, input_ids, attention_mask, completion_mask, with_log_sum_sq,
                            token_stats=token_stats)


def _padded_logprobs(model, input_ids, attention_mask, completion_mask, with_log_sum_sq: bool, *,
                     token_stats: bool = True) -> LogProbs:
    return sequence_logprobs(model, input_ids, attention_mask, completion_mask, with_log_sum_sq=with_log_sum_sq,
                             token_stats=token_stats)


def _packed_logprobs(model, input_ids, attention_mask, completion_mask, with_log_sum_sq: bool, *,
                     token_stats: bool = True, segments: bool = False) -> LogProbs:
    with _packed_forward(model, input_ids, attention_mask, completion_mask, segments) as (ids, comp, pos, placement,
                                                                                          kwargs):
        out = sequence_logprobs(model, ids, None, comp, position_ids=pos, with_log_sum_sq=with_log_sum_sq,
                                token_stats=token_stats, attention_kwargs=kwargs)
    width = input_ids.shape[1]
    per_token = _unpack(out.per_token_logps, placement, width)
    mean_logits = _unpack(out.mean_logits, placement, width)
    entropy, is_top1 = ((None, None) if out.entropy is None else
                        (_unpack(out.entropy, placement, width), _unpack(out.is_top1, placement, width)))
    lssp = None if out.log_sum_sq_probs is None else _unpack(out.log_sum_sq_probs, placement, width)
    mask = completion_mask.clone().bool()
    mask[:, 0] = False
    return LogProbs(per_token_logps=per_token, sum_logps=per_token.sum(dim=1),
                    num_tokens=mask.to(per_token.dtype).sum(dim=1), mean_logits=mean_logits,
                    entropy=entropy, is_top1=is_top1, log_sum_sq_probs=lssp)


def ld_weighted(per_token: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO: tokens beyond the shorter completion of each pair count with weight alpha.
    Rows are [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]."""
    position = mask.long().cumsum(dim=1)  # 1..n within each completion
    lengths = mask.long().sum(dim=1)
    c_len, r_len = lengths.chunk(2)
    shared = torch.minimum(c_len, r_len).repeat(2)[:, None]
    in_shared = (position > 0) & (position <= shared) & mask.bool()
    in_tail = (position > shared) & mask.bool()
    return (per_token * in_shared).sum(dim=1) + alpha * (per_token * in_tail).sum(dim=1)


def preference_logprobs(model, batch: PreferenceBatch, *, ld_alpha: float | None = None,
                        use_weighting: bool = False, padding_free: bool | None = None,
                        token_stats: bool = True) -> PreferenceLogProbs:
    """Chosen and rejected log-probs from one concatenated forward (TRL's DPO inputs), with
    the entropy / token-accuracy metrics when `token_stats`."""
    from rayalign.losses import wpo_weights

    device = _device(model)
    ids = batch.input_ids.to(device)
    attn = batch.attention_mask.to(device)
    comp = batch.completion_mask.to(device)
    out = batch_logprobs(model, ids, attn, comp, padding_free=padding_free, with_log_sum_sq=use_weighting,
                         token_stats=token_stats)
    mask = comp.clone().bool()
    mask[:, 0] = False
    logps = out.sum_logps if ld_alpha is None else ld_weighted(out.per_token_logps, mask, ld_alpha)
    b = len(batch)
    c_mask, r_mask = mask[:b], mask[b:]
    c_tokens, r_tokens = c_mask.sum().clamp(min=1), r_mask.sum().clamp(min=1)
    weights = (None, None)
    if use_weighting:
        w = wpo_weights(out.per_token_logps, out.log_sum_sq_probs, mask)
        weights = (w[:b], w[b:])
    stats = {}
    if token_stats:  # TRL's entropy: completion tokens of both halves; mean_token_accuracy: chosen ones
        entropy_sum, top1_sum = (out.entropy * mask).sum(), (out.is_top1[:b] & c_mask).sum()
        stats = {"entropy": entropy_sum / mask.sum().clamp(min=1), "chosen_token_accuracy": top1_sum / c_tokens,
                 "entropy_sum": entropy_sum, "chosen_top1_sum": top1_sum}
    c_logits, r_logits = (out.mean_logits[:b] * c_mask).sum(), (out.mean_logits[b:] * r_mask).sum()
    return PreferenceLogProbs(
        chosen_logps=logps[:b], rejected_logps=logps[b:],
        chosen_lengths=out.num_tokens[:b], rejected_lengths=out.num_tokens[b:],
        chosen_mean_logits=c_logits / c_tokens, rejected_mean_logits=r_logits / r_tokens,
        chosen_per_token_logps=out.per_token_logps[:b],
        chosen_weights=weights[0], rejected_weights=weights[1],
        chosen_logits_sum=c_logits, rejected_logits_sum=r_logits, **stats)


def sft_logprobs(model, batch: SequenceBatch, *, padding_free: bool | None = None,
                 token_stats: bool = True) -> LogProbs:
    """Completion log-probs of single sequences (the SFT job), with each completion token's
    entropy and argmax hit when `token_stats` (TRL SFTTrainer's entropy / mean_token_accuracy)."""
    device = _device(model)
    return batch_logprobs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                          batch.completion_mask.to(device), padding_free=padding_free,
                          token_stats=token_stats)


# ----------------------------------------------------------------------------- reward models


def _pooled_decoder_and_score(model):
    """(decoder, score head, pad id) of a transformers sequence classifier whose forward is
    `GenericForSequenceClassification`'s (Llama, Qwen2/3, Mistral, ...: score(decoder(x)) read
    at each row's last non-pad token), else None: then only the model's own forward is used."""
    from transformers.modeling_layers import GenericForSequenceClassification

    module = getattr(model, "module", model)
    if hasattr(module, "get_base_model"):  # PEFT
        module = module.get_base_model()
    if not isinstance(module, GenericForSequenceClassification) or "forward" in vars(module):
        return None
    if type(module).forward is not GenericForSequenceClassification.forward:
        return None
    pad = module.config.get_text_config().pad_token_id
    decoder, score = getattr(module, module.base_model_prefix, None), getattr(module, "score", None)
    if pad is None or decoder is None or score is None or hasattr(getattr(score, "weight", None), "ds_id"):
        return None
    return decoder, score, pad


def _padded_scores(model, input_ids, attention_mask) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _packed_scores(model, input_ids, attention_mask, segments: bool = False) -> torch.Tensor | None:
    decoder, score, pad = _pooled_decoder_and_score(model)
    # The position transformers pools: each row's last token that is not the pad id.
    last = (torch.arange(input_ids.shape[1], device=input_ids.device) * (input_ids != pad)).argmax(-1)
    if bool((last >= attention_mask.sum(dim=1)).any()):
        return None  # padded with another id than the model's pad id: its forward reads padding
    with _packed_forward(model, input_ids, attention_mask, attention_mask, segments) as (ids, _, pos, placement,
                                                                                         kwargs):
        hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).last_hidden_state
    rows = torch.tensor([row for row, _, _ in placement], device=input_ids.device)
    cols = torch.tensor([start for _, start, _ in placement], device=input_ids.device) + last
    return score(hidden[rows, cols])


def score_packing_supported(model) -> bool:
    """`packing_supported` for sequence classifiers: packed scores equal the model's own."""
    parts = _pooled_decoder_and_score(model)
    if parts is None:
        return False
    return _probe_packing(model, _SCORE_PACKING_ATTR, _padded_scores, _packed_scores, avoid=parts[2])


def sequence_scores(model, input_ids, attention_mask, *, padding_free: bool | None = None) -> torch.Tensor:
    """A sequence classifier's (N, num_labels) scores, read where transformers reads them;
    packed (padding-free) when `padding_free` is true, or None and `score_packing_supported`.
    A batch padded with another id than the model's pad id (its forward would read a padding
    position) takes the padded forward."""
    device = _device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if padding_free is None:
        padding_free = score_packing_supported(model)
    elif padding_free and _pooled_decoder_and_score(model) is None:
        padding_free = False  # a classifier with its own pooling: only its forward knows it
    if padding_free:
        scores = _packed_scores(model, input_ids, attention_mask)
        if scores is not None:
            return scores
    return _padded_scores(model, input_ids, attention_mask)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
