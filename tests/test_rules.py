"""Partition rules: merge(split(x, n)) == x for every rule and n, and the documented layouts."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkit import rules
from ckptkit.errors import BadInput


@given(n=st.sampled_from([1, 2, 4]), rows=st.integers(1, 6), cols=st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_every_rule_merges_back_what_it_split(n, rows, cols):
    full_rows, full_cols = rows * n * 2, cols * n
    tensor = torch.randn(full_rows, full_cols)
    for rule in (rules.ColumnParallel(), rules.RowParallel(), rules.GatedMLP(), rules.Replicated()):
        assert torch.equal(rule.merge(rule.split(tensor, n)), tensor), rule.name
    qkv = rules.FusedQKV(num_query_groups=n * 2, heads_per_group=rows, head_dim=cols)
    fused = torch.randn(n * 2 * (rows + 2) * cols, 3)
    assert torch.equal(qkv.merge(qkv.split(fused, n)), fused)


def test_gqa_split_keeps_whole_groups_per_rank():
    # 2 groups of 2 query heads, head_dim 1: rows [q0 q1 k0 v0 | q2 q3 k1 v1]
    rows = torch.tensor([0, 1, 100, 200, 2, 3, 101, 201]).float()
    shards = rules.FusedQKV(num_query_groups=2, heads_per_group=2, head_dim=1).split(rows, 2)
    assert shards[0].tolist() == [0, 1, 100, 200]
    assert shards[1].tolist() == [2, 3, 101, 201]


def test_qkv_refuses_more_ranks_than_query_groups():
    rule = rules.FusedQKV(num_query_groups=1, heads_per_group=4, head_dim=2)
    with pytest.raises(BadInput, match="1 query groups cannot be split over 2"):
        rule.split(torch.zeros(12, 4), 2)


def test_gated_mlp_ranks_hold_their_own_gate_and_up_halves():
    full = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23]).float()  # [g0 g1 g2 g3 u0 u1 u2 u3]
    shards = rules.GatedMLP().split(full, 2)
    assert shards[0].tolist() == [10, 11, 20, 21]
    assert shards[1].tolist() == [12, 13, 22, 23]


def test_vocab_split_pads_with_zero_rows_and_merge_keeps_padding():
    rule = rules.VocabParallel(vocab_size=5, padded_rows=6)
    full = torch.arange(1, 6).float().unsqueeze(1)
    shards = rule.split(full, 2)
    assert shards[0].flatten().tolist() == [1, 2, 3]
    assert shards[1].flatten().tolist() == [4, 5, 0]
    assert rule.merge(shards).flatten().tolist() == [1, 2, 3, 4, 5, 0]


def test_vocab_split_drops_extra_padding_rows_for_a_smaller_padded_size():
    rule = rules.VocabParallel(vocab_size=5, padded_rows=6)
    padded_for_tp4 = torch.arange(1, 9).float().unsqueeze(1)  # 5 real rows + 3 padding rows
    assert rule.merge(rule.split(padded_for_tp4, 2)).flatten().tolist() == [1, 2, 3, 4, 5, 6]


def test_row_parallel_splits_input_features():
    full = torch.arange(8).float().reshape(2, 4)
    shards = rules.RowParallel().split(full, 2)
    assert shards[0].tolist() == [[0, 1], [4, 5]]


def test_non_dividing_split_names_the_shape():
    with pytest.raises(BadInput, match=r"shape \(3, 2\) is not divisible by 2"):
        rules.ColumnParallel().split(torch.zeros(3, 2), 2)


def test_max_abs_difference_of_copies_is_zero_when_equal_and_the_largest_difference_otherwise():
    a = torch.zeros(4)
    b = torch.tensor([0, 0, 0.5, 0])
    assert rules.max_abs_difference(a, a.clone()) == 0.0
    assert rules.max_abs_difference(a, b) == 0.5
    assert rules.max_abs_difference(a, torch.zeros(5)) == float("inf")


def test_max_abs_difference_of_float16_copies_does_not_overflow():
    a = torch.tensor([60000.0], dtype=torch.float16)
    assert rules.max_abs_difference(a, -a) == 120000.0


def test_max_abs_difference_leaves_its_inputs_unchanged():
    a, b = torch.zeros(3), torch.ones(3)
    rules.max_abs_difference(a, b)
    assert b.tolist() == [1.0, 1.0, 1.0] and a.tolist() == [0.0, 0.0, 0.0]
