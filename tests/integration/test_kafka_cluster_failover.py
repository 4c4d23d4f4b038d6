"""Outpost on a three-broker cluster (RF 3, min.insync.replicas 2) while brokers fail.

Each test runs `outpost run` with simulator devices writing a three-partition topic through
the cluster's proxies, breaks the cluster in one way while records keep coming, heals it,
and then checks with kcat (an independent consumer on the brokers' direct listeners) that
every record the gateway stored up to its acknowledged seq is in Kafka, each device's
records in one partition and in the order they were read, duplicates only from resends.

- the leader of a partition the gateway writes is killed with SIGKILL mid-stream;
- a rolling restart: each broker in turn stopped and started while records keep coming;
- two brokers killed: the survivor refuses acks=all writes with NotEnoughReplicas (seen by
  kcat as a producer, and the gateway acknowledges nothing while it lasts) until one returns;
- the link to one broker (a partition leader) cut at its proxy while the brokers stay up.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from tests.integration.test_kafka_cluster_support import (
    ClusterGateway,
    audit,
    device_key,
    kcat_read,
    partition_of,
    unique_topic,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

PARTITIONS = 3
BATCH = 200
# A failure resends at most the windows in flight: two, of at most one batch per partition.
RESEND_LIMIT = 2 * BATCH * PARTITIONS


async def _started(kafka_cluster, tmp_path, name: str) -> tuple[ClusterGateway, str]:
    topic = unique_topic(name)
    await asyncio.to_thread(kafka_cluster.create_topic, topic, PARTITIONS)
    gw = ClusterGateway(tmp_path / name, name, kafka_cluster.proxied_bootstrap, topic,
                        batch_max_records=BATCH)
    gw.start()
    await gw.wait_acked(0, 90, "first records acknowledged")
    return gw, topic


async def _finish(gw: ClusterGateway, kafka_cluster, kcat: str, topic: str, faults: int):
    acked, last = await gw.drain_and_stop()
    messages = await asyncio.to_thread(kcat_read, kcat, kafka_cluster.bootstrap, topic)
    result = audit(messages, {gw.gateway_id: (acked, last)})
    print(f"{gw.edge}: acked {acked}, stored {last}, messages {result.messages}, "
          f"duplicates {result.duplicates}")
    result.check(max_duplicates=faults * RESEND_LIMIT)
    assert acked > 100, f"only {acked} records acknowledged: the test streamed too little"
    return result


async def test_partition_leader_killed_mid_stream(kafka_cluster, kcat, tmp_path) -> None:
    gw, topic = await _started(kafka_cluster, tmp_path, "leader-kill")
    try:
        await asyncio.sleep(3)
        p = partition_of(device_key(gw, 0), PARTITIONS)
        leader = await asyncio.to_thread(kafka_cluster.leader_of, topic, p)
        at_kill = await gw.acked_seq()
        kafka_cluster.broker(leader).kill9()
        new_leader = await asyncio.to_thread(kafka_cluster.wait_leader, topic, p, leader)
        assert new_leader != leader
        # Records stored after the kill are acknowledged while the old leader is still dead:
        # the gateway found the new leader by itself.
        await gw.wait_acked(at_kill + 60, 90, f"records acked after leader {leader} was killed")
        await asyncio.sleep(2)
        assert not kafka_cluster.broker(leader).alive()
        await _finish(gw, kafka_cluster, kcat, topic, faults=1)
    finally:
        await gw.stop()


async def test_rolling_restart_of_every_broker(kafka_cluster, kcat, tmp_path) -> None:
    gw, topic = await _started(kafka_cluster, tmp_path, "rolling")
    try:
        for broker in kafka_cluster.brokers:
            before = await gw.acked_seq()
            await asyncio.to_thread(broker.stop)  # controlled shutdown: leaders handed over
            await asyncio.sleep(1)
            await asyncio.to_thread(broker.start)
            await asyncio.to_thread(kafka_cluster.wait_brokers, 3, 120)
            await asyncio.to_thread(kafka_cluster.wait_isr, topic, 3, PARTITIONS, 120)
            await gw.wait_acked(before + 20, 90, f"records acked across the restart of "
                                                 f"broker {broker.node_id}")
        # Each restart moves leaders away and (preferred leader election) back.
        await _finish(gw, kafka_cluster, kcat, topic, faults=2 * len(kafka_cluster.brokers))
    finally:
        await gw.stop()


def _kcat_produce_acks_all(kcat: str, bootstrap: str, topic: str) -> str:
    """One record with acks=all and no retries; kcat's report (stdout + stderr)."""
    done = subprocess.run(
        [kcat, "-P", "-b", bootstrap, "-t", topic, "-p", "0", "-X", "acks=all",
         "-X", "message.send.max.retries=0", "-X", "message.timeout.ms=5000"],
        input="probe\n", capture_output=True, text=True, timeout=60, check=False,
    )
    return done.stdout + done.stderr


async def test_two_brokers_down_refuse_writes_until_one_returns(kafka_cluster, kcat, tmp_path) -> None:
    gw, topic = await _started(kafka_cluster, tmp_path, "two-down")
    probe_topic = unique_topic("probe")
    await asyncio.to_thread(kafka_cluster.create_topic, probe_topic, 1)
    try:
        await asyncio.sleep(2)
        p = partition_of(device_key(gw, 0), PARTITIONS)
        survivor = await asyncio.to_thread(kafka_cluster.leader_of, topic, p)
        dead = [b for b in kafka_cluster.brokers if b.node_id != survivor]
        for b in dead:
            b.kill9()
        # The controller fences them; every ISR shrinks to the survivor alone.
        await asyncio.to_thread(kafka_cluster.wait_isr, topic, 1, PARTITIONS, 60, True)
        await asyncio.to_thread(kafka_cluster.wait_isr, probe_topic, 1, 1, 60, True)
        survivor_addr = kafka_cluster.broker(survivor).internal
        refusal = await asyncio.to_thread(_kcat_produce_acks_all, kcat, survivor_addr, probe_topic)
        assert "Not enough in-sync replicas" in refusal, refusal
        # While refused, the gateway acknowledges nothing (a refusal is not an ack) and
        # keeps the records; let it retry several delivery deadlines.
        await asyncio.sleep(3)
        held = await gw.acked_seq()
        samples = []
        for _ in range(10):
            await asyncio.sleep(1)
            samples.append(await gw.acked_seq())
        assert samples == [held] * len(samples), samples
        status = await gw.status()
        kafka_link = status["links"]["kafka"]
        assert not kafka_link["up"], kafka_link
        assert gw.process.alive()
        # One broker back: two in sync again, writes accepted, the backlog goes out.
        await asyncio.to_thread(dead[0].start)
        await asyncio.to_thread(kafka_cluster.wait_isr, topic, 2, PARTITIONS, 120)
        await gw.wait_acked(held + 20, 120, "records acked after a second broker returned")
        await _finish(gw, kafka_cluster, kcat, topic, faults=2)
        print(f"gateway's last error while refused: {kafka_link['last_error']!r}")
    finally:
        await gw.stop()


async def test_link_to_one_broker_cut_while_the_cluster_is_up(kafka_cluster, kcat, tmp_path) -> None:
    gw, topic = await _started(kafka_cluster, tmp_path, "link-cut")
    try:
        await asyncio.sleep(2)
        p = partition_of(device_key(gw, 0), PARTITIONS)
        leader = await asyncio.to_thread(kafka_cluster.leader_of, topic, p)
        proxy = kafka_cluster.broker(leader).proxy
        before = await gw.acked_seq()
        proxy.cut()
        saw_down = False
        end = time.monotonic() + 12  # several delivery deadlines (2 x request_timeout = 6 s)
        while time.monotonic() < end:
            st = await gw.status()
            if st is not None and not st["links"]["kafka"]["up"]:
                saw_down = True
            await asyncio.sleep(0.5)
        # Only the gateway's path was cut: the broker stayed in the cluster and kept leading.
        assert await asyncio.to_thread(kafka_cluster.leader_of, topic, p) == leader
        assert saw_down, "the gateway never noticed that a partition leader was unreachable"
        proxy.restore()
        await gw.wait_acked(before + 60, 90, f"records acked after the link to broker {leader} "
                                             "came back")
        await _finish(gw, kafka_cluster, kcat, topic, faults=2)
    finally:
        await gw.stop()
