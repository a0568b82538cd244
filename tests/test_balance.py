"""Dealing a synchronous step's rows across learners by tokens (rayalign.batch.deal_rows):
the same rows in the same micro-batch slots, every rank about the same tokens."""

import math
import random

import pytest

from rayalign.batch import deal_by_tokens, deal_rows, imbalance, row_tokens


def _pair(prompt: int, chosen: int, rejected: int, tag: int = 0) -> dict:
    return {"prompt_ids": [1] * prompt, "chosen_ids": [2] * chosen, "rejected_ids": [3] * rejected, "tag": tag}


def test_row_tokens_counts_each_sequence_cut_at_max_length():
    assert row_tokens(_pair(10, 5, 7)) == 15 + 17
    assert row_tokens(_pair(10, 50, 7), max_length=32) == 32 + 17
    assert row_tokens({"prompt_ids": [1, 2], "completion_ids": [3, 4, 5]}) == 5  # SFT


def test_deal_gives_every_row_once_in_equal_groups_and_evens_the_tokens():
    tokens = [700, 650, 600, 550, 20, 30, 25, 40]  # split in order: two ranks get the long rows
    groups = deal_by_tokens(tokens, 4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(len(g) == 2 and g == sorted(g) for g in groups)
    contiguous = [sum(tokens[i:i + 2]) for i in range(0, 8, 2)]  # 1350, 1150, 50, 65
    dealt = [sum(tokens[i] for i in g) for g in groups]
    assert sorted(dealt) == [590, 630, 675, 720]  # each long row with a short one
    assert imbalance(dealt) < 1.11 < 2 < imbalance(contiguous)
    assert deal_by_tokens(tokens, 4) == groups  # the same on every rank


def test_deal_evens_long_tailed_lengths_where_the_split_does_not():
    """Lengths like the realistic-scale data (log-normal, p90/p50 = 2.76, cut at 3.25x the median):
    8 ranks x 4 pairs, contiguous split vs deal, over 200 steps."""
    rng = random.Random(0)
    sigma = math.log(326 / 118) / 1.2816

    def seq() -> int:
        return int(118 * min(math.exp(rng.gauss(0, sigma)), 384 / 118))

    split, dealt = [], []
    for _ in range(200):
        tokens = [seq() + seq() for _ in range(32)]
        split.append(imbalance([sum(tokens[i:i + 4]) for i in range(0, 32, 4)]))
        dealt.append(imbalance([sum(tokens[i] for i in g) for g in deal_by_tokens(tokens, 8)]))
    assert sum(split) / 200 > 1.25  # the slowest of 8 ranks computes a quarter longer than the mean
    assert sum(dealt) / 200 < 1.06
    assert all(d <= s + 1e-9 for d, s in zip(dealt, split))


def test_deal_rows_keeps_each_micro_batch_slot_and_its_rows():
    """2 ranks x 2 micro-batches of 2: slot m of every share is dealt among the ranks, so the
    step's micro-batch m holds the same rows as before (gradient accumulation unchanged)."""
    rows = [_pair(5, n, n, tag=i) for i, n in enumerate([100, 90, 80, 70, 1, 2, 3, 4])]
    shares, before, after = deal_rows(rows, groups=2, per=2)
    assert [len(s) for s in shares] == [4, 4]
    for m in range(2):
        slot = {r["tag"] for r in rows[2 * m:2 * m + 2] + rows[4 + 2 * m:4 + 2 * m + 2]}
        assert {r["tag"] for s in shares for r in s[2 * m:2 * m + 2]} == slot
    assert sum(before) == sum(after) == sum(row_tokens(r) for r in rows)
    assert before == [sum(row_tokens(r) for r in rows[:4]), sum(row_tokens(r) for r in rows[4:])]
    assert imbalance(after) < 1.1 < 1.5 < imbalance(before)


def test_uneven_rows_are_refused_by_count():
    with pytest.raises(ValueError, match="7 rows do not split into 2 equal groups"):
        deal_by_tokens([1] * 7, 2)
    with pytest.raises(ValueError, match="6 rows are not 2 shares of whole micro-batches of 2"):
        deal_rows([_pair(1, 1, 1)] * 6, groups=2, per=2)
