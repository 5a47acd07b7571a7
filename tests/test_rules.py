"""Partition rules: merge(split(x, n)) == x for every rule and n, and the documented layouts."""
import pytest
import torch
from hypothesis import assume, given, settings
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


# ---------------------------------------------------------------------------- geometry

def _rule_and_full_tensor(kind, n, rows, cols, vocab_extra):
    """A rule of ``kind`` and a full tensor (in the rule's coordinates) it can split over ``n`` ranks."""
    if kind == "qkv":
        rule = rules.FusedQKV(num_query_groups=n * rows, heads_per_group=cols, head_dim=2)
        return rule, torch.randn(n * rows * (cols + 2) * 2, 3)
    if kind == "vocab":
        padded = n * rows
        rule = rules.VocabParallel(vocab_size=padded - vocab_extra, padded_rows=padded)
        return rule, torch.randn(padded, cols)
    rule = {"replicated": rules.Replicated(), "column": rules.ColumnParallel(), "row": rules.RowParallel(),
            "gated": rules.GatedMLP()}[kind]
    return rule, torch.randn(rows * n * 2, cols * n)


KINDS = ["replicated", "column", "row", "vocab", "qkv", "gated"]


@given(kind=st.sampled_from(KINDS), n=st.sampled_from([1, 2, 3, 4, 8]), rows=st.integers(1, 5),
       cols=st.integers(1, 4), vocab_extra=st.integers(0, 3))
@settings(max_examples=150, deadline=None)
def test_the_ranks_boxes_tile_the_full_tensor_exactly(kind, n, rows, cols, vocab_extra):
    assume(kind != "vocab" or vocab_extra < n * rows)
    rule, full = _rule_and_full_tensor(kind, n, rows, cols, vocab_extra)
    assert rule.full_shape(full.shape) == tuple(full.shape)
    distinct = {box for rank in range(n) for box in rule.boxes(full.shape, n, rank)}
    covered = torch.zeros(full.shape, dtype=torch.int32)
    for box in distinct:
        covered[rules.box_slices(box)] += 1
    assert torch.equal(covered, torch.ones_like(covered))


@given(kind=st.sampled_from(KINDS), n=st.sampled_from([1, 2, 3, 4, 8]), rows=st.integers(1, 5),
       cols=st.integers(1, 4), vocab_extra=st.integers(0, 3))
@settings(max_examples=150, deadline=None)
def test_each_split_piece_is_its_ranks_boxes_of_the_full_tensor(kind, n, rows, cols, vocab_extra):
    assume(kind != "vocab" or vocab_extra < n * rows)
    rule, full = _rule_and_full_tensor(kind, n, rows, cols, vocab_extra)
    pieces = rule.split(full, n)
    for rank, piece in enumerate(pieces):
        regions = [full[rules.box_slices(box)] for box in rule.boxes(full.shape, n, rank)]
        assert torch.equal(piece, torch.cat(regions, dim=0))
        assert tuple(piece.shape) == rule.shard_shape(full.shape, n)
        assert torch.equal(rule.shard(full, n, rank), piece)


def test_gated_mlp_ranks_hold_two_boxes_their_gate_and_their_up_block():
    assert rules.GatedMLP().boxes((8, 3), 2, 1) == [((2, 0), (2, 3)), ((6, 0), (2, 3))]


def test_vocab_boxes_and_shard_shape_are_in_padded_rows():
    rule = rules.VocabParallel(vocab_size=5, padded_rows=8)
    assert rule.full_shape((5, 4)) == (8, 4)
    assert rule.boxes((5, 4), 2, 1) == [((4, 0), (4, 4))]
    assert rule.shard_shape((5, 4), 2) == (4, 4)
    assert rule.shard(torch.ones(5, 4), 2, 1).sum().item() == 4  # one real row, three zero rows


def test_a_replicated_shard_is_the_full_tensor_itself_not_a_copy():
    full = torch.randn(4, 3)
    piece = rules.Replicated().shard(full, 4, 3)
    assert piece.data_ptr() == full.data_ptr() and piece.shape == full.shape


def test_old_checkpoint_versions_reorder_only_fused_qkv_rows():
    qkv = rules.FusedQKV(num_query_groups=2, heads_per_group=1, head_dim=3)
    current = torch.arange(2 * 3 * 3).float()  # one rank's rows, 2 heads
    version0 = current.reshape(2, 3, 3).transpose(0, 1).reshape(-1)
    assert torch.equal(qkv.from_checkpoint_version(version0, 0), current)
    assert qkv.from_checkpoint_version(current, 3.0) is current
    assert rules.ColumnParallel().from_checkpoint_version(version0, 0) is version0
