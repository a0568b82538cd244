"""Attention over packed rows, one sequence at a time.

A packed row holds several sequences with restarting position ids. Given only those
position ids, transformers builds a block-diagonal causal mask and sdpa computes attention
over the whole row: every (row x row) block, masked ones included, and none of the
causal-mask savings of `is_causal`. On the learner's rows that was ~13% of a DPO step at
17M parameters (torch.profiler, CPU flash kernel, forward + backward).

`packed_sdpa` is registered with transformers' `AttentionInterface` under `NAME`. Called
with `segments` (every row's `(start, length)` spans, tail padding included as a span of its
own), it runs sdpa with `is_causal=True` on each span: the cost of the sequences' own causal
squares. Called without them (padded batches, `generate`) it is transformers' sdpa, mask
and all, so a model switched to it (`use_packed_attention`) behaves as before everywhere
else. The packed paths of `rayalign.models.logprobs` pass the spans; its packing probe
compares them with the padded forward once per model.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

NAME = "rayalign_packed_sdpa"
SEGMENTS = "rayalign_segments"  # the forward kwarg that carries the spans
Segments = Sequence[Sequence[tuple[int, int]]]  # per packed row: (start, length) spans covering it

_ATTR = "_rayalign_packed_attention"
# True inside `segment_forward`: the spans replace the mask, which is not built (a block-diagonal
# mask of one packed row is (positions x positions): 12 ms at 3072 positions, growing with the square)
_SPANS_ONLY = contextvars.ContextVar("rayalign_spans_only", default=False)


def packed_sdpa(module, query, key, value, attention_mask, *, rayalign_segments: Segments | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa; with `rayalign_segments`, causal sdpa on each span of each row
    (query/key/value: (rows, heads, positions, head_dim); returns (rows, positions, heads,
    head_dim) as sdpa does)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rayalign_segments is None:
        if _SPANS_ONLY.get():  # no mask was built for this forward: without spans it would attend across rows' sequences
            raise RuntimeError(f"{NAME}: a packed forward reached attention without its {SEGMENTS} "
                               "(a wrapper dropped the forward's kwargs)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    # unbind / split rather than slicing: their backward is one stack / cat, where each slice's
    # backward would write its gradient into a zero-filled tensor of the whole input
    for q, k, v, spans in zip(query.unbind(0), key.unbind(0), value.unbind(0), rayalign_segments):
        lengths = [n for _, n in spans]
        parts = [sdpa_attention_forward(module, qs[None], ks[None], vs[None], None, is_causal=True, **kwargs)[0]
                 for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


@contextmanager
def segment_forward(enabled: bool = True) -> Iterator[None]:
    """Around a forward that passes `rayalign_segments`: no attention mask is built for it."""
    token = _SPANS_ONLY.set(enabled)
    try:
        yield
    finally:
        _SPANS_ONLY.reset(token)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME in AttentionInterface._global_mapping:
        return
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def mask(*args, **kwargs):
        # other calls build the mask sdpa would (an unregistered name would get no mask at all)
        return None if _SPANS_ONLY.get() else sdpa_mask(*args, **kwargs)

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, mask)


def _full_attention_only(config) -> bool:
    """No sliding-window layers: a span's causal square is then exactly its mask."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(t == "full_attention" for t in layer_types)
    if getattr(config, "use_sliding_window", None) is False:
        return True
    return getattr(config, "sliding_window", None) is None


def use_packed_attention(module, model_types: frozenset[str]) -> bool:
    """Switch `module` (a transformers model, unwrapped) from sdpa to `packed_sdpa` when it is
    one of `model_types`, attends with sdpa through the attention interface and has no
    sliding-window layers; whether it did is remembered on the module. The switch is not
    saved with the model (transformers does not serialise the attention implementation)."""
    known = getattr(module, _ATTR, None)
    if known is not None:
        return known
    config = getattr(module, "config", None)
    ok = (config is not None and getattr(config, "model_type", None) in model_types
          and getattr(config, "_attn_implementation", None) == "sdpa" and _full_attention_only(config))
    if ok:
        try:  # transformers versions without the interfaces (or a class that cannot switch) keep sdpa
            ok = bool(type(module)._can_set_attn_implementation())
            if ok:
                _register()
                module.set_attn_implementation(NAME)
                ok = config._attn_implementation == NAME
        except (ImportError, AttributeError, KeyError, ValueError):
            ok = False
    setattr(module, _ATTR, ok)
    return ok


def row_segments(placement: Sequence[tuple[int, int, int]], rows: int, width: int) -> list[list[tuple[int, int]]]:
    """Every packed row's spans, in order, from `_pack`'s placement ((row, start, length) per
    sequence, back to back from position 0): the sequences, and the unused tail as one more
    span, so that each row's spans cover it."""
    spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    for row, start, n in placement:
        if n:
            spans[row].append((start, n))
    for row in spans:
        row.sort()
        end = row[-1][0] + row[-1][1] if row else 0
        if end < width:
            row.append((end, width - end))
    return spans
