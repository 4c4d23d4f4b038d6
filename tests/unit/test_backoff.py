"""The one backoff: bounds, growth, full jitter, reset."""

from __future__ import annotations

import random

import pytest

from common.backoff import Backoff


def test_never_below_min_never_above_max() -> None:
    b = Backoff(1.0, 60.0, rand=random.Random(7).random)
    delays = [b.next() for _ in range(40)]
    assert all(1.0 <= d <= 60.0 for d in delays)


def test_the_range_doubles_until_the_cap() -> None:
    top = Backoff(1.0, 60.0, rand=lambda: 1.0)
    assert [top.next() for _ in range(8)] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    bottom = Backoff(1.0, 60.0, rand=lambda: 0.0)
    assert {bottom.next() for _ in range(8)} == {1.0}  # full jitter reaches down to min_s


def test_jitter_spreads_a_crowd() -> None:
    rng = random.Random(3)
    firsts = []
    for _ in range(50):
        b = Backoff(1.0, 60.0, rand=rng.random)
        for _ in range(5):
            b.next()
        firsts.append(round(b.next(), 6))
    assert len(set(firsts)) > 40


def test_reset_starts_over() -> None:
    b = Backoff(0.5, 10.0, rand=lambda: 1.0)
    for _ in range(6):
        b.next()
    assert b.cap() == 10.0
    b.reset()
    assert b.next() == 1.0  # the first range again: [0.5, 1.0]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
