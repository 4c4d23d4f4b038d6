"""The one reconnect/restart backoff of the whole tree (drivers, uplinks, inbound, tasks).

Capped exponential growth with full jitter: the n-th delay (n from 0) is drawn uniformly
from [min_s, min(max_s, min_s * 2**(n+1))], so even the first retry of a crowd is spread
over a range. Never below `min_s` (a crowd of gateways coming back
after a broker restart still spreads out, and nobody hammers faster than configured), never
above `max_s`. The reset rule is the caller's single decision: call `reset()` once the thing
worked (a session was established, a window was acknowledged, a task ran for a while).
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    __slots__ = ("_rand", "attempt", "max_s", "min_s")

    def __init__(self, min_s: float, max_s: float, *, rand: Callable[[], float] = random.random) -> None:
        if min_s <= 0 or max_s < min_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s!r}, {max_s!r}")
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self.attempt = 0
        self._rand = rand

    def cap(self) -> float:
        """The upper bound of the next delay."""
        return min(self.max_s, self.min_s * (2 ** min(self.attempt + 1, 40)))

    def next(self) -> float:
        """The delay before the next attempt; each call widens the range up to `max_s`."""
        cap = self.cap()
        self.attempt += 1
        return self.min_s + self._rand() * (cap - self.min_s)

    def reset(self) -> None:
        self.attempt = 0
