"""Client libraries' repeated connection errors are logged once per window, new ones always."""

import logging

from common.logs import RepeatFilter


def _rec(msg: str) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, None, None)


def test_repeats_are_dropped_new_messages_pass() -> None:
    f = RepeatFilter(window_s=600)
    assert f.filter(_rec("Unable connect to 127.0.0.1:9092"))
    assert not any(f.filter(_rec("Unable connect to 127.0.0.1:9092")) for _ in range(100))
    assert f.filter(_rec("SASL authentication failed"))
    assert f.suppressed == 100


def test_window_expiry_lets_a_reminder_through() -> None:
    f = RepeatFilter(window_s=0.0)
    assert f.filter(_rec("x")) and f.filter(_rec("x"))
