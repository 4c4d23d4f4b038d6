"""Structured log lines and the once-down/once-up StateLog."""

from __future__ import annotations

import io
import json
import logging

import pytest

from common.logs import JsonFormatter, KeyValueFormatter, StateLog, fields, setup_logging


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter(with_time=False))
    logger = logging.getLogger("test.outpost.statelog")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_kv_line_quotes_values_that_need_it(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.warning(
        "link down", extra=fields(link="mqtt", reason='connect "refused" at x', n=3, ok=False, none=None)
    )
    assert lines(stream) == [
        'level=warning logger=test.outpost.statelog msg="link down" link=mqtt '
        'reason="connect \\"refused\\" at x" n=3 ok=false none=-'
    ]


def test_kv_line_escapes_newlines_so_one_event_stays_one_line(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.error("bad frame", extra=fields(raw="a\nb"))
    assert lines(stream) == ['level=error logger=test.outpost.statelog msg="bad frame" raw="a\\nb"']


def test_json_formatter_keeps_fields_and_never_lets_them_override_core_keys() -> None:
    record = logging.LogRecord("gw", logging.INFO, __file__, 1, "device online", (), None)
    record.outpost_fields = {"device": "meter1", "msg": "spoofed", "errors": 2}
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "device online"
    assert doc["device"] == "meter1" and doc["errors"] == 2
    assert doc["level"] == "info" and doc["ts"].endswith("Z")


def test_setup_logging_replaces_its_own_handler_on_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
        first, second = io.StringIO(), io.StringIO()
        setup_logging("info", "kv", stream=first)
        setup_logging("debug", "json", stream=second)
        logging.getLogger("gateway.test").debug("hello", extra=fields(a=1))
        assert first.getvalue() == ""
        line = second.getvalue()
        assert line.startswith("<7>"), "under journald every line carries its syslog priority"
        assert json.loads(line[3:])["a"] == 1
        third = io.StringIO()
        setup_logging("info", "kv", stream=third)
        logging.getLogger("gateway.test").warning("careful", extra=fields(b=2))
        logging.getLogger("gateway.test").error("broken")
        assert third.getvalue().splitlines()[0].startswith("<4>level=warning ")
        assert third.getvalue().splitlines()[1].startswith("<3>level=error ")
        with pytest.raises(ValueError, match="log format"):
            setup_logging("info", "xml")
        with pytest.raises(ValueError, match="log level"):
            setup_logging("loud", "kv")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_kv_line_has_no_timestamp_under_journald_but_has_one_elsewhere() -> None:
    record = logging.LogRecord("gw", logging.INFO, __file__, 1, "x", (), None)
    assert not KeyValueFormatter(with_time=False).format(record).startswith("ts=")
    assert KeyValueFormatter(with_time=True).format(record).startswith("ts=")


def test_outage_is_logged_once_and_recovery_once_with_the_suppressed_count(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    clock = FakeClock()
    states = StateLog(logger, clock=clock)
    assert states.problem("link:kafka", "link down", link="kafka", reason="timeout") is True
    for i in range(500):
        clock.t += 1
        reason = "timeout" if i < 499 else "connection refused"
        assert states.problem("link:kafka", "link down", link="kafka", reason=reason) is False
    assert states.is_open("link:kafka") and states.suppressed("link:kafka") == 500
    clock.t += 0.5
    assert states.recovered("link:kafka", "link up", link="kafka") is True
    assert states.recovered("link:kafka", "link up", link="kafka") is False
    assert lines(stream) == [
        "level=warning logger=test.outpost.statelog msg=\"link down\" link=kafka reason=timeout",
        "level=info logger=test.outpost.statelog msg=\"link up\" link=kafka after_s=500.5 "
        "suppressed=500 last_reason=\"connection refused\"",
    ]
    assert states.open_keys() == []


def test_keys_are_independent(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    states = StateLog(logger, clock=FakeClock())
    states.problem("device:m1", "device offline", device="m1")
    states.problem("device:m2", "device offline", device="m2")
    states.problem("device:m1", "device offline", device="m1")
    states.recovered("device:m2", "device online", device="m2")
    assert states.open_keys() == ["device:m1"]
    assert [line.split("msg=")[1] for line in lines(stream)] == [
        '"device offline" device=m1',
        '"device offline" device=m2',
        '"device online" device=m2 after_s=0 suppressed=0',
    ]


def test_recovery_without_a_problem_writes_nothing(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    assert StateLog(logger).recovered("link:mqtt", "link up") is False
    assert stream.getvalue() == ""


def test_long_outage_reminds_at_most_once_per_interval(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    clock = FakeClock()
    states = StateLog(logger, remind_every_s=600, clock=clock)
    states.problem("buffer:dropping", "buffer dropping oldest records", reason="max_age")
    written = 0
    for _ in range(1800):  # 30 minutes of one-second polls
        clock.t += 1
        written += states.problem("buffer:dropping", "buffer dropping oldest records", reason="max_age")
    assert written == 3
    reminders = [line for line in lines(stream) if "still" in line]
    assert len(reminders) == 3
    assert "for_s=600" in reminders[0] and "repeats=600" in reminders[0]
