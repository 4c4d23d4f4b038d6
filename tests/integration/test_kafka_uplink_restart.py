"""Kafka uplink across restarts: the broker stopped and started mid-stream, and the
gateway process killed with SIGKILL during an outage and started again.

Kafka is reached only through the Toxiproxy proxy; kcat reads the result directly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import pytest

from gateway.uplinks.kafka.mappings import Mapping
from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
from tests.harness.common import REPO_ROOT
from tests.helpers import flat
from tests.integration.test_kafka_support import (
    GATEWAY_ID,
    Feeder,
    check_delivery,
    kcat_consume_async,
    open_buffer,
    running,
    unique_topic,
    wait_acked,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WINDOW = 200


def _settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=(bootstrap,),
        linger_s=0.05,
        batch_max_records=WINDOW,
        request_timeout_s=2.0,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
        metadata_max_age_s=5.0,
    )


async def test_broker_stopped_and_restarted_mid_stream(kafka, kcat, tmp_path) -> None:
    topic = unique_topic("broker-restart")
    kafka.create_topic(topic, partitions=2)
    kafka.proxy.restore()
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    uplink = KafkaUplink(_settings(kafka.proxied_bootstrap), buf,
                         [Mapping("telemetry", ("spBv1.0/#",), topic)], GATEWAY_ID)
    try:
        async with running(uplink) as task:
            await feeder.run_for(1.5)
            # The broker's controlled shutdown and start run in a thread while readings
            # keep arriving and the uplink keeps trying.
            feeding = asyncio.create_task(feeder.run_for(1000), name="feeder")
            try:
                await asyncio.to_thread(kafka.stop)
                await asyncio.sleep(3)
                await asyncio.to_thread(kafka.start)
                await asyncio.sleep(1.5)
            finally:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            await wait_acked(uplink, task, feeder.last_seq, limit_s=90)
            assert flat(uplink.state)["reconnects"] >= 1  # it did see the broker go away
    finally:
        await buf.close()
    messages = await kcat_consume_async(kcat, kafka.bootstrap, topic)
    check_delivery(messages, feeder.appended, max_duplicates=WINDOW)


# The gateway in miniature: appends readings to the buffer and runs the Kafka uplink.
# Prints "APPENDED <seq>" after each committed append, and "DONE" once everything it
# appended has been acknowledged by Kafka (feeding stops after `feed_s` seconds).
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.uplinks.kafka.mappings import Mapping
    from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
    from tests.integration.test_kafka_support import GATEWAY_ID, Feeder, open_buffer

    async def main(path, bootstrap, topic, feed_s):
        buf = await open_buffer(path)
        feeder = Feeder(buf)
        s = KafkaSettings(bootstrap_servers=(bootstrap,), linger_s=0.05, batch_max_records=200,
                          request_timeout_s=2.0, reconnect_min_s=0.2, reconnect_max_s=1.0)
        uplink = KafkaUplink(s, buf, [Mapping("t", ("spBv1.0/#",), topic)], GATEWAY_ID)
        task = asyncio.create_task(uplink.run())
        loop = asyncio.get_running_loop()
        end = loop.time() + feed_s
        while loop.time() < end:
            await feeder.tick()
            print("APPENDED", feeder.last_seq, flush=True)
            await asyncio.sleep(0.05)
        while (uplink.state.extra["acked_seq"] or 0) < feeder.last_seq:
            await asyncio.sleep(0.1)
        print("DONE", flush=True)
        await uplink.stop()
        await task
        await buf.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
    """
)


async def _start_child(db: str, bootstrap: str, topic: str, feed_s: float):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, db, bootstrap, topic, str(feed_s),
        cwd=str(REPO_ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )


async def _read_lines(proc, sink: list[str]) -> None:
    assert proc.stdout is not None
    async for line in proc.stdout:
        sink.append(line.decode().strip())


async def test_sigkill_during_an_outage_then_restart_loses_nothing(kafka, kcat, tmp_path) -> None:
    topic = unique_topic("sigkill")
    kafka.create_topic(topic, partitions=2)
    proxy = kafka.proxy
    proxy.restore()
    db = str(tmp_path / "buffer.db")
    lines: list[str] = []
    first = await _start_child(db, kafka.proxied_bootstrap, topic, feed_s=600)
    reader = asyncio.create_task(_read_lines(first, lines), name="child-1-stdout")
    try:
        await asyncio.sleep(4)
        proxy.cut()
        await asyncio.sleep(5)  # longer than the child's request timeout: it knows it is down
        os.kill(first.pid, signal.SIGKILL)
        assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL
        await asyncio.wait_for(reader, 10)
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
        proxy.restore()
    committed_before_kill = [int(x.split()[1]) for x in lines if x.startswith("APPENDED")]
    assert len(committed_before_kill) > 50

    lines2: list[str] = []
    second = await _start_child(db, kafka.proxied_bootstrap, topic, feed_s=2)
    try:
        await asyncio.wait_for(_read_lines(second, lines2), 90)
        assert await asyncio.wait_for(second.wait(), 30) == 0
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
    assert lines2[-1] == "DONE"
    committed_after = [int(x.split()[1]) for x in lines2 if x.startswith("APPENDED")]

    messages = await kcat_consume_async(kcat, kafka.bootstrap, topic)
    in_kafka = {int(m["headers"]["outpost-seq"]) for m in messages}
    appended_seqs = set()
    # Each APPENDED line covers the 4 records of one tick, ending at that seq.
    for last in committed_before_kill + committed_after:
        appended_seqs.update(range(last - 3, last + 1))
    missing = sorted(appended_seqs - in_kafka)
    assert not missing, f"{len(missing)} committed records never reached Kafka: {missing[:10]}"
    # Order per key after dropping duplicates, across both processes.
    per_key: dict[str, list[int]] = {}
    seen: set[int] = set()
    dups: dict[int, int] = {}
    for m in sorted(messages, key=lambda m: (m["partition"], m["offset"])):
        seq = int(m["headers"]["outpost-seq"])
        if seq not in seen:
            seen.add(seq)
            per_key.setdefault(m["key"], []).append(seq)
        else:
            dups[m["partition"]] = dups.get(m["partition"], 0) + 1
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"{key}: out of order"
    # At most one batch (<= batch_max_records) per partition per process is repeated.
    assert max(dups.values(), default=0) <= 2 * WINDOW, dups
