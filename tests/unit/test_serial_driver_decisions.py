"""The serial-line driver's decisions on a real asyncio stream (no port): framing errors are
counted and logged once per kind, valid lines make samples, silence and loss go offline."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from drivers.base import DeviceState, Quality, WriteRejected
from drivers.serial_line.codec import Framer, checksum_text
from drivers.serial_line.config import SerialLineDeviceConfig
from drivers.serial_line.driver import SerialLineDriver


def make(**kw):
    base = {"driver": "serial_line", "name": "s", "port": "/dev/null", "parser": "csv",
            "checksum": "sum8", "max_line_length": 20,
            "points": [{"name": "a", "source": 0}, {"name": "b", "source": 1, "type": "int16"}]}
    base.update(kw)
    cfg = SerialLineDeviceConfig.model_validate(base)
    samples, events = [], []
    return SerialLineDriver(cfg, samples.append, events.append), cfg, samples, events


def line(body: str) -> bytes:
    return f"{body}*{checksum_text('sum8', body)}\r\n".encode()


async def read(drv: SerialLineDriver, cfg, data: bytes, *, eof: bool = False) -> int:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await drv._read_frames(reader, Framer(cfg), 0.05, until_one=False)


async def test_valid_lines_make_samples_and_the_device_online() -> None:
    drv, cfg, samples, events = make()
    assert await read(drv, cfg, line("1.5,7") + line("2.5,-8")) == 2
    assert [(s.point, s.value, s.quality) for s in samples] == [
        ("a", 1.5, Quality.GOOD), ("b", 7, Quality.GOOD), ("a", 2.5, Quality.GOOD), ("b", -8, Quality.GOOD)]
    assert [s.datatype for s in samples[:2]] == ["float64", "int16"]
    assert [e.state for e in events] == [DeviceState.ONLINE]
    assert drv.stats["frames"] == 2 and drv.stats["samples"] == 4 and drv.stats["bad_lines"] == 0


async def test_bad_lines_are_counted_kept_and_logged_once_per_kind(caplog) -> None:
    drv, cfg, samples, _events = make()
    with caplog.at_level(logging.WARNING, logger="drivers.serial_line.driver"):
        bad_sum = b"1.5,7*00\r\n"
        handled = await read(drv, cfg, bad_sum + bad_sum + b"1.5\r\n" + line("x,1") + line("3,4"))
    assert handled == 1 and drv.stats["frames"] == 5 and drv.stats["bad_lines"] == 4
    assert drv.last_bad_line == "x,1*" + checksum_text("sum8", "x,1") + "\r"   # as received
    warnings = [getattr(r, "outpost_fields", {}).get("reason", r.getMessage()) for r in caplog.records]
    assert len([w for w in warnings if "checksum mismatch" in w]) == 1      # the same kind: once
    assert any("no sum8 checksum" in w for w in warnings)
    assert any("'x' is not a number" in w for w in warnings)
    assert [(s.point, s.value) for s in samples] == [("a", 3.0), ("b", 4)]


async def test_an_overlong_line_is_an_overflow_and_a_bad_line() -> None:
    drv, cfg, samples, _ = make()
    assert await read(drv, cfg, b"9" * 30 + b"\r\n" + line("1,2")) == 1
    assert drv.stats["overflows"] == 1 and drv.stats["bad_lines"] == 1
    assert [s.value for s in samples] == [1.0, 2]


async def test_sentences_not_asked_for_are_skipped_not_counted_as_bad() -> None:
    drv, cfg, samples, _ = make(parser="nmea", checksum="nmea", sentence="GPGGA",
                                points=[{"name": "a", "source": 1}])
    other = "$GPRMC,1"
    wanted = "$GPGGA,2"
    data = f"{other}*{checksum_text('nmea', other)}\r\n{wanted}*{checksum_text('nmea', wanted)}\r\n"
    assert await read(drv, cfg, data.encode()) == 1
    assert drv.stats["bad_lines"] == 0 and drv.stats["frames"] == 2
    assert [s.value for s in samples] == [2.0]


async def test_end_of_stream_is_a_lost_port() -> None:
    drv, cfg, *_ = make()
    with pytest.raises(EOFError):
        await read(drv, cfg, b"", eof=True)


async def test_polled_reads_return_with_the_first_frame_or_nothing_at_the_deadline() -> None:
    drv, cfg, samples, _ = make()
    reader = asyncio.StreamReader()
    framer = Framer(cfg)
    reader.feed_data(b"1,")                         # half a line: no frame by the deadline
    assert await drv._read_frames(reader, framer, 0.05, until_one=True) == 0
    reader.feed_data(line("1,2")[2:] + line("3,4"))
    assert await drv._read_frames(reader, framer, 30.0, until_one=True) == 2   # both arrived at once
    assert [s.value for s in samples] == [1.0, 2, 3.0, 4]


def test_silence_and_loss_take_the_device_offline_with_bad_points_once() -> None:
    drv, _cfg, samples, events = make(offline_after="2s")
    drv._set_online(False, "port /dev/null unavailable")     # never online: an event, no samples
    assert [e.state for e in events] == [DeviceState.OFFLINE] and samples == []
    drv._set_online(True, "")
    drv._last_good = time.monotonic()
    drv._check_silence("quiet")
    assert events[-1].state is DeviceState.ONLINE            # not silent for long enough
    drv._last_good = time.monotonic() - 3.0
    drv._check_silence("no valid line for 2s")
    assert events[-1].state is DeviceState.OFFLINE and events[-1].reason == "no valid line for 2s"
    assert [(s.point, s.value, s.quality, s.reason) for s in samples] == [
        ("a", None, Quality.BAD, "no valid line for 2s"), ("b", None, Quality.BAD, "no valid line for 2s")]
    drv._check_silence("still quiet")
    assert len(events) == 3 and len(samples) == 2            # a state, not a repetition


async def test_points_are_read_only() -> None:
    drv, *_ = make()
    with pytest.raises(WriteRejected, match="'s': points are read-only"):
        await drv.write("s", "a", 1)
    assert drv.devices() == ["s"]


async def test_each_overlong_line_is_counted_once() -> None:
    drv, cfg, _samples, _ = make()
    reader = asyncio.StreamReader()
    framer = Framer(cfg)
    reader.feed_data(b"9" * 30 + b"\r\n")
    assert await drv._read_frames(reader, framer, 0.05, until_one=False) == 0
    reader.feed_data(b"8" * 30 + b"\r\n" + line("1,2"))
    assert await drv._read_frames(reader, framer, 0.05, until_one=False) == 1
    assert drv.stats["overflows"] == 2 and drv.stats["bad_lines"] == 2


async def test_a_polled_read_waits_for_the_rest_of_a_line_until_its_deadline() -> None:
    drv, cfg, samples, _ = make()
    reader = asyncio.StreamReader()
    reader.feed_data(b"1,")                         # the answer starts ...
    asyncio.get_running_loop().call_later(0.05, reader.feed_data, line("1,2")[2:])   # ... and ends
    assert await drv._read_frames(reader, Framer(cfg), 30.0, until_one=True) == 1
    assert [s.value for s in samples] == [1.0, 2]


async def test_the_last_bad_line_is_kept_to_200_characters() -> None:
    drv, cfg, _samples, _ = make(max_line_length=400)
    assert await read(drv, cfg, b"x" * 250 + b"\r\n") == 0
    assert drv.stats["bad_lines"] == 1 and drv.last_bad_line == "x" * 200


def test_offline_and_online_events_carry_their_reason_and_bad_samples_a_time() -> None:
    drv, _cfg, samples, events = make(offline_after="2s")
    drv._set_online(False, "port /dev/null unavailable")
    drv._set_online(True, "")
    before = int(time.time() * 1000)
    drv._set_online(False, "port /dev/null lost: gone")
    assert [(e.state, e.reason) for e in events] == [
        (DeviceState.OFFLINE, "port /dev/null unavailable"), (DeviceState.ONLINE, ""),
        (DeviceState.OFFLINE, "port /dev/null lost: gone")]
    assert all(isinstance(s.ts_ms, int) and s.ts_ms >= before - 1 for s in samples) and len(samples) == 2
    assert {s.device for s in samples} == {"s"}
