"""Read planning: coalescing under caps and max gap, never splitting a value, holes."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.planner import (
    Hole,
    PlanPoint,
    hole_between,
    one_per_point,
    plan_reads,
    split_block,
)


def pts(*spec, table="holding"):
    return [PlanPoint(f"p{a}", table, a, c) for a, c in spec]


def test_contiguous_points_become_one_request():
    blocks = plan_reads(pts((0, 2), (2, 2), (4, 1)))
    assert [(b.address, b.count) for b in blocks] == [(0, 5)]


def test_gap_beyond_max_gap_starts_a_new_request():
    blocks = plan_reads(pts((0, 1), (5, 1), (20, 1)), max_gap=4)
    assert [(b.address, b.count) for b in blocks] == [(0, 6), (20, 1)]


def test_cap_is_respected_and_values_are_never_split():
    blocks = plan_reads(pts((0, 2), (2, 2), (4, 2)), max_registers=5)
    assert [(b.address, b.count) for b in blocks] == [(0, 4), (4, 2)]


def test_tables_never_mix_and_bits_have_their_own_cap():
    points = pts((0, 1), (1, 1)) + pts((0, 1), (1500, 1), (2500, 1), table="coil")
    blocks = plan_reads(points, max_bits=2000, max_gap=3000)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("coil", 0, 1501), ("coil", 2500, 1), ("holding", 0, 2),
    ]


def test_bits_of_one_register_share_a_request():
    blocks = plan_reads(pts((3, 1), (3, 1), (4, 2)))
    assert len(blocks) == 1 and len(blocks[0].points) == 3


def test_holes_are_never_spanned():
    blocks = plan_reads(pts((0, 1), (5, 1)), holes=[Hole("holding", 2, 4)])
    assert [(b.address, b.count) for b in blocks] == [(0, 1), (5, 1)]
    # a barrier between adjacent registers
    blocks = plan_reads(pts((0, 1), (1, 1)), holes=[Hole("holding", 1, 1)])
    assert len(blocks) == 2


def test_split_and_hole_between():
    (block,) = plan_reads(pts((0, 2), (4, 2), (8, 2)))
    left, right = split_block(block)
    assert [p.address for p in left.points] == [0]
    assert [p.address for p in right.points] == [4, 8]
    assert hole_between(left, right) == Hole("holding", 2, 4)


def test_one_per_point_is_the_naive_plan():
    assert len(one_per_point(pts((0, 1), (1, 1)))) == 2


@given(
    spec=st.lists(st.tuples(st.integers(0, 400), st.sampled_from([1, 2, 4])), min_size=1, max_size=60),
    cap=st.integers(4, 125),
    gap=st.integers(0, 20),
)
def test_every_point_lands_whole_in_one_request_within_cap(spec, cap, gap):
    points = [PlanPoint(i, "input", a, c) for i, (a, c) in enumerate(spec)]
    blocks = plan_reads(points, max_registers=cap, max_gap=gap)
    seen = []
    for b in blocks:
        assert 1 <= b.count <= cap
        for p in b.points:
            assert b.address <= p.address and p.address + p.count <= b.end
            seen.append(p.key)
    assert sorted(seen) == sorted(p.key for p in points)
    assert_as_large_as_allowed(blocks, cap=cap, gap=gap, holes=())


def assert_as_large_as_allowed(blocks, *, cap, gap, holes):
    """Optimality of the merge: no block could have taken in the first point of the next one."""
    for b in blocks:
        assert b.address == min(p.address for p in b.points)
        assert b.end == max(p.address + p.count for p in b.points)
    for left, right in itertools.pairwise(blocks):
        if left.table != right.table:
            continue
        assert (left.address, left.end) <= (right.address, right.end)
        first = min(right.points, key=lambda q: (q.address, q.count))
        end = max(left.end, first.address + first.count)
        too_long = end - left.address > cap
        too_far = first.address - left.end > gap
        refused = any(
            h.table == left.table and (
                (left.address < h.end and end > h.start) if h.end > h.start else left.address < h.start < end)
            for h in holes)
        assert too_long or too_far or refused, (left, right)


@settings(deadline=None)
@given(
    spec=st.lists(st.tuples(st.integers(0, 200), st.sampled_from([1, 2, 4])), min_size=1, max_size=40),
    holes=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 6)), max_size=4),
    cap=st.integers(4, 60),
    gap=st.integers(0, 20),
)
def test_merging_is_as_large_as_allowed_with_holes(spec, holes, cap, gap):
    points = [PlanPoint(i, "holding", a, c) for i, (a, c) in enumerate(spec)]
    hole_list = [Hole("holding", s, s + w) for s, w in holes] + [Hole("input", 0, 1000)]
    blocks = plan_reads(points, max_registers=cap, max_gap=gap, holes=hole_list)
    assert sorted(p.key for b in blocks for p in b.points) == sorted(p.key for p in points)
    for b in blocks:
        assert b.count <= cap
        if len(b.points) > 1:
            assert not any(h.conflicts(b.table, b.address, b.end) for h in hole_list)
    assert_as_large_as_allowed(blocks, cap=cap, gap=gap, holes=hole_list)


def test_a_hole_blocks_merging_only_where_it_is():
    points = pts((0, 1), (1, 1), (10, 1), (11, 1), (20, 2), (22, 2))
    blocks = plan_reads(points, max_gap=5, holes=[Hole("holding", 14, 16), Hole("input", 0, 100)])
    assert [(b.address, b.count) for b in blocks] == [(0, 2), (10, 2), (20, 4)]
    # a hole in another table changes nothing
    blocks = plan_reads(pts((0, 1), (3, 1)), holes=[Hole("input", 1, 2), Hole("coil", 1, 1)])
    assert [(b.address, b.count) for b in blocks] == [(0, 4)]


def test_hole_conflicts_exactly_where_it_overlaps():
    hole = Hole("holding", 2, 4)
    assert [hole.conflicts("holding", s, e) for s, e in ((0, 2), (0, 3), (3, 5), (4, 6), (1, 5), (2, 4))] == [
        False, True, True, False, True, True]
    assert not hole.conflicts("input", 0, 10)
    barrier = Hole("holding", 3, 3)
    assert [barrier.conflicts("holding", s, e) for s, e in ((0, 3), (0, 4), (3, 5), (2, 4))] == [
        False, True, False, True]
    assert not barrier.conflicts("coil", 0, 10)


def test_default_caps_and_gap():
    blocks = plan_reads(pts(*[(a, 1) for a in range(126)]))
    assert [(b.address, b.count) for b in blocks] == [(0, 125), (125, 1)]
    coils = plan_reads(pts(*[(a, 1) for a in range(2001)], table="coil"))
    assert [(b.address, b.count) for b in coils] == [(0, 2000), (2000, 1)]
    assert [(b.address, b.count) for b in plan_reads(pts((0, 1), (11, 1)))] == [(0, 12)]
    assert [(b.address, b.count) for b in plan_reads(pts((0, 1), (12, 1)))] == [(0, 1), (12, 1)]
    assert [b.table for b in plan_reads(pts((0, 1), table="discrete") + pts((0, 1), table="input"))] == [
        "discrete", "input"]


def test_exact_cap_and_gap_boundaries():
    assert len(plan_reads(pts((0, 2), (3, 2)), max_registers=5, max_gap=1)) == 1
    assert len(plan_reads(pts((0, 2), (3, 2)), max_registers=4, max_gap=1)) == 2
    assert len(plan_reads(pts((0, 2), (3, 2)), max_registers=5, max_gap=0)) == 2
    # a point inside the span of a wider one does not stretch the block
    (block,) = plan_reads(pts((10, 4), (11, 1)), max_registers=4)
    assert (block.address, block.count, len(block.points)) == (10, 4, 2)
    bits = plan_reads(pts((0, 1), (4, 1), table="discrete"), max_bits=5, max_registers=1)
    assert [(b.address, b.count) for b in bits] == [(0, 5)]


def test_a_point_larger_than_the_cap_is_refused():
    assert plan_reads(pts((0, 4)), max_registers=4)[0].count == 4
    try:
        plan_reads(pts((0, 5)), max_registers=4)
    except ValueError as e:
        assert "'p0' takes 5 > cap 4" in str(e)
    else:
        raise AssertionError("a 5-register point was planned under a cap of 4")


def test_blocks_carry_their_points_in_address_order():
    blocks = plan_reads(pts((8, 2), (0, 2), (4, 2)))
    assert [p.address for p in blocks[0].points] == [0, 4, 8]
    assert blocks[0].end == 10
    (naive,) = one_per_point(pts((7, 3)))
    assert (naive.table, naive.address, naive.count, naive.end) == ("holding", 7, 3, 10)
    assert [p.key for p in naive.points] == ["p7"]


def test_split_block_edges():
    (block,) = plan_reads(pts((0, 1), (2, 1), (4, 3)))
    left, right = split_block(block)
    assert (left.table, left.address, left.count) == ("holding", 0, 1)
    assert (right.table, right.address, right.count) == ("holding", 2, 5)
    left, right = split_block(plan_reads(pts((0, 1), (2, 1)))[0])
    assert (left.address, left.count, right.address, right.count) == (0, 1, 2, 1)
    try:
        split_block(plan_reads(pts((0, 1)))[0])
    except ValueError as e:
        assert "cannot be split" in str(e)
    else:
        raise AssertionError("a single-point block was split")


def test_hole_between_overlapping_halves_is_a_barrier():
    (block,) = plan_reads(pts((3, 1), (3, 1), (3, 1)))
    left, right = split_block(block)
    assert hole_between(left, right) == Hole("holding", 3, 3)
    (block,) = plan_reads(pts((0, 2), (1, 2)), max_registers=10)
    left, right = split_block(block)
    assert hole_between(left, right) == Hole("holding", 1, 1)
    (block,) = plan_reads(pts((0, 2), (2, 2)))
    assert hole_between(*split_block(block)) == Hole("holding", 2, 2)
