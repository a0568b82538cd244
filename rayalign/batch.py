"""Typed batches that move between the driver and the actors.

A `PreferenceBatch` holds B preference pairs as one right-padded tensor block of 2B rows:
rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, so a single forward pass
scores both halves (TRL's "concatenated forward").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Sequence

import torch


@dataclass
class PreferenceBatch:
    """B preference pairs, chosen rows first then rejected rows, right-padded.

    `completion_mask` marks completion tokens (unshifted: position t is 1 when token t
    belongs to the completion, eos included). `ref_*_logps` are present when the reference
    log-probs were precomputed (or computed by a reference actor) for this batch.
    """

    input_ids: torch.Tensor  # (2B, L) long
    attention_mask: torch.Tensor  # (2B, L) long
    completion_mask: torch.Tensor  # (2B, L) long
    ref_chosen_logps: torch.Tensor | None = None  # (B,) float
    ref_rejected_logps: torch.Tensor | None = None  # (B,) float
    margin: torch.Tensor | None = None  # (B,) float, reward-model margin column

    def __len__(self) -> int:
        return self.input_ids.shape[0] // 2

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping] | Mapping[str, Sequence],
        pad_token_id: int,
        max_length: int | None = None,
        truncation_mode: str = "keep_start",
    ) -> "PreferenceBatch":
        """Collate tokenized rows (`prompt_ids`, `chosen_ids`, `rejected_ids`, optional
        `ref_chosen_logps`, `ref_rejected_logps`, `margin`) into a padded batch.

        Each prompt+completion sequence is truncated to `max_length` on its own, keeping its
        start or its end (TRL 1.16's collator). Accepts a list of row dicts or a dict of
        columns (what Ray Data's `iter_batches(batch_format="numpy")` yields).
        """
        rows = as_row_list(rows)
        if not rows:
            raise ValueError("PreferenceBatch.from_rows got an empty batch")
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for row in rows:
                prompt = [int(t) for t in row["prompt_ids"]]
                completion = [int(t) for t in row[key]]
                seqs.append(prompt + completion)
                masks.append([0] * len(prompt) + [1] * len(completion))
        seqs, masks = truncate(seqs, masks, max_length, truncation_mode)
        input_ids, attention_mask, completion_mask = pad_sequences(seqs, masks, pad_token_id)
        extras = {}
        for name in ("ref_chosen_logps", "ref_rejected_logps", "margin"):
            if all(_present(row.get(name)) for row in rows):
                extras[name] = torch.tensor([float(row[name]) for row in rows], dtype=torch.float32)
        return cls(input_ids, attention_mask, completion_mask, **extras)

    def select(self, pair_indices: Sequence[int]) -> "PreferenceBatch":
        """The sub-batch of the given pair indices (trailing all-padding columns dropped)."""
        b = len(self)
        idx = torch.tensor(list(pair_indices), dtype=torch.long)
        rows = torch.cat([idx, idx + b])
        attention = self.attention_mask[rows]
        width = int(attention.sum(dim=1).max().item()) if attention.numel() else 0
        width = max(width, 1)
        kwargs = {
            "input_ids": self.input_ids[rows, :width],
            "attention_mask": attention[:, :width],
            "completion_mask": self.completion_mask[rows, :width],
        }
        for name in ("ref_chosen_logps", "ref_rejected_logps", "margin"):
            value = getattr(self, name)
            kwargs[name] = None if value is None else value[idx]
        return PreferenceBatch(**kwargs)

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                for f in fields(self)
            }
        )

    def pin_memory(self) -> "PreferenceBatch":
        return PreferenceBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory())
                                  for f in fields(self)})

    def with_reference(self, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> "PreferenceBatch":
        """A copy carrying reference log-probs."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs["ref_chosen_logps"] = ref_chosen.detach().float().cpu()
        kwargs["ref_rejected_logps"] = ref_rejected.detach().float().cpu()
        return PreferenceBatch(**kwargs)


@dataclass
class SequenceBatch:
    """N single sequences (SFT rows or prompt+completion for scoring), right-padded."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    completion_mask: torch.Tensor  # (N, L)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_rows(
        cls, rows: Sequence[Mapping] | Mapping[str, Sequence], pad_token_id: int,
        max_length: int | None = None, truncation_mode: str = "keep_start",
    ) -> "SequenceBatch":
        """Collate rows with `prompt_ids` and `completion_ids` (truncated like PreferenceBatch)."""
        rows = as_row_list(rows)
        if not rows:
            raise ValueError("SequenceBatch.from_rows got an empty batch")
        seqs, masks = [], []
        for row in rows:
            prompt = [int(t) for t in row["prompt_ids"]]
            completion = [int(t) for t in row["completion_ids"]]
            seqs.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
        seqs, masks = truncate(seqs, masks, max_length, truncation_mode)
        return cls(*pad_sequences(seqs, masks, pad_token_id))

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def pin_memory(self) -> "SequenceBatch":
        return SequenceBatch(*(getattr(self, f.name).pin_memory() for f in fields(self)))


def truncate(seqs, masks, max_length: int | None, truncation_mode: str):
    """Cut each sequence (and its mask) to max_length, keeping its start or its end."""
    if max_length is None:
        return seqs, masks
    sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    return [s[sl] for s in seqs], [m[sl] for m in masks]


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists and their completion masks into (ids, attention, completion)."""
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return input_ids, attention_mask, completion_mask


def as_row_list(rows: Sequence[Mapping] | Mapping[str, Sequence]) -> list[Mapping]:
    """Row dicts from a list of rows or a dict of columns (Ray Data's numpy batches)."""
    if isinstance(rows, Mapping):
        keys = list(rows.keys())
        n = len(rows[keys[0]]) if keys else 0
        return [{k: rows[k][i] for k in keys} for i in range(n)]
    return list(rows)


COMPLETION_COLUMNS = ("chosen_ids", "rejected_ids", "completion_ids")


def row_tokens(row: Mapping, max_length: int | None = None) -> int:
    """Tokens a row puts through the model: prompt + completion for each of its sequences
    (a preference pair has two), each cut at max_length as the collators cut it."""
    prompt = len(row["prompt_ids"]) if "prompt_ids" in row else 0
    cap = max_length if max_length is not None else float("inf")
    return int(sum(min(prompt + len(row[k]), cap) for k in COMPLETION_COLUMNS if k in row))


def deal_by_tokens(tokens: Sequence[int], groups: int) -> list[list[int]]:
    """Indices of `tokens` dealt into `groups` groups of len(tokens) // groups each, so that
    the groups' token sums are as near equal as a greedy deal gets: longest first, each to
    the group with the fewest tokens that still has room (ties: the lowest group). Every
    index lands in exactly one group; each group keeps its indices in ascending order. The
    same input gives the same deal on every rank."""
    if groups < 1 or len(tokens) % groups:
        raise ValueError(f"deal_by_tokens: {len(tokens)} rows do not split into {groups} equal groups")
    room = len(tokens) // groups
    load, members = [0] * groups, [[] for _ in range(groups)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        g = min((g for g in range(groups) if len(members[g]) < room), key=lambda g: (load[g], g))
        load[g] += tokens[i]
        members[g].append(i)
    return [sorted(m) for m in members]


def imbalance(loads: Sequence[int]) -> float:
    """The largest group's tokens over the mean: how much longer a synchronous step's slowest
    rank computes than the average one (1.0: even)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def imbalance_metrics(before: Sequence[int], after: Sequence[int]) -> dict[str, float]:
    """The step metrics of a deal: the ranks' token imbalance as dealt and as split."""
    return {"perf/rank_tokens_imbalance": imbalance(after), "perf/rank_tokens_imbalance_unbalanced": imbalance(before)}


def deal_rows(rows: Sequence[Mapping], groups: int, per: int,
              max_length: int | None = None) -> tuple[list[list[Mapping]], list[int], list[int]]:
    """`rows` laid out as `groups` consecutive shares of micro-batches of `per` rows, dealt
    again by tokens: micro-batch m of every share is pooled and dealt into `groups` new
    micro-batches of `per` rows (`deal_by_tokens`), so the step trains on the same rows in
    the same micro-batch slots, and each rank of a synchronous step gets about the same
    tokens. Returns (the new shares, each group's tokens before, after)."""
    if groups < 1 or len(rows) % (groups * per):
        raise ValueError(f"deal_rows: {len(rows)} rows are not {groups} shares of whole micro-batches of {per}")
    share = len(rows) // groups
    tokens = [row_tokens(r, max_length) for r in rows]
    before = [sum(tokens[g * share:(g + 1) * share]) for g in range(groups)]
    shares: list[list[Mapping]] = [[] for _ in range(groups)]
    after = [0] * groups
    for start in range(0, share, per):
        slot = [g * share + start + j for g in range(groups) for j in range(per)]
        for g, picked in enumerate(deal_by_tokens([tokens[i] for i in slot], groups)):
            shares[g].extend(rows[slot[k]] for k in picked)
            after[g] += sum(tokens[slot[k]] for k in picked)
    return shares, before, after
