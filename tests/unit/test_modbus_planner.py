"""Read planning: coalescing under caps and max gap, never splitting a value, holes."""

from hypothesis import given
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
    assert len(blocks) <= len(points)
