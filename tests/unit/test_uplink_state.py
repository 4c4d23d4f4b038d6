"""The uplink contract (gateway/uplinks/core.py) and the outcome classifications of the two
uplinks: what a PUBACK reason code means (MQTT), which produce errors refuse a topic and
which are the link's (Kafka). Pure: no broker, no cluster.

The state's events are read back the three ways an operator reads them: the status
document (`as_dict`, `summary`), the Prometheus exposition of the real metric set, and the
log lines (once per outage, once per recovery)."""

from __future__ import annotations

import logging
import re
import time

import pytest
from aiokafka import errors as kafka_errors

from common.backoff import Backoff
from gateway.diagnostics.metrics import GatewayMetrics
from gateway.errors import UplinkError
from gateway.uplinks.core import HELD_PREFIX, HeldDestination, Outcome, UplinkState, held_key, held_topics
from gateway.uplinks.kafka import adapter
from gateway.uplinks.mqtt import client as mqtt

# ---------------------------------------------------------------- MQTT: PUBACK outcomes


@pytest.mark.parametrize(("code", "outcome"), [
    (0x00, Outcome.DELIVERED),                    # success
    (0x10, Outcome.DELIVERED),                    # no matching subscribers: delivered
    (0x7F, Outcome.DELIVERED),                    # below 0x80 is never a failure (MQTT 5 2.4)
    (0x80, Outcome.REFUSED_DESTINATION),          # unspecified: what ACL plugins send
    (0x83, Outcome.REFUSED_DESTINATION),          # implementation specific
    (0x87, Outcome.REFUSED_DESTINATION),          # not authorised
    (0x90, Outcome.REFUSED_DESTINATION),          # topic name invalid
    (0x97, Outcome.REFUSED_DESTINATION),          # quota exceeded
    (0x91, Outcome.RETRIABLE),                    # packet identifier in use
    (0x95, Outcome.REFUSED_RECORD),               # packet too large
    (0x99, Outcome.REFUSED_RECORD),               # payload format invalid
    (0x96, Outcome.REFUSED_DESTINATION),          # neighbours of the record codes
    (0x98, Outcome.REFUSED_DESTINATION),
    (0x9A, Outcome.REFUSED_DESTINATION),
    (0x92, Outcome.REFUSED_DESTINATION),
])
def test_a_puback_reason_code_decides_what_becomes_of_the_record(code: int, outcome: Outcome) -> None:
    assert mqtt.puback_outcome(code) is outcome


def test_the_named_reason_codes_are_the_mqtt5_ones() -> None:
    assert (mqtt.RC_PACKET_TOO_LARGE, mqtt.RC_PAYLOAD_FORMAT_INVALID, mqtt.RC_PACKET_ID_IN_USE,
            mqtt.RC_NOT_AUTHORIZED, mqtt.RC_QUOTA_EXCEEDED) == (0x95, 0x99, 0x91, 0x87, 0x97)
    assert mqtt.reason_text(0x87) == "0x87 not authorized"
    assert mqtt.reason_text(0x01) == "0x01 reason"


# ---------------------------------------------------------------- Kafka: produce errors


@pytest.mark.parametrize(("exc", "refuses", "link", "too_large"), [
    (adapter.DestinationRefused("t", "not authorised"), True, True, False),
    (kafka_errors.TopicAuthorizationFailedError(), True, True, False),
    (kafka_errors.ClusterAuthorizationFailedError(), True, True, False),
    (kafka_errors.UnknownTopicOrPartitionError(), True, True, False),
    (kafka_errors.PolicyViolationError(), True, True, False),
    (kafka_errors.KafkaConnectionError(), False, True, False),
    (kafka_errors.NotLeaderForPartitionError(), False, True, False),
    (kafka_errors.MessageSizeTooLargeError(), False, True, True),
    (kafka_errors.RecordListTooLargeError(), False, True, True),
    (ConnectionResetError(), False, True, False),
    (TimeoutError(), False, True, False),
    (OSError(), False, True, False),
    (ValueError("a bug"), False, False, False),
    (KeyError("x"), False, False, False),
])
def test_kafka_produce_errors_are_told_apart(exc: BaseException, refuses: bool, link: bool,
                                             too_large: bool) -> None:
    assert adapter.refuses_destination(exc) is refuses
    assert adapter.is_link_error(exc) is link
    assert adapter.is_too_large(exc) is too_large


def test_an_uplink_error_is_a_link_error_exactly_when_it_is_retriable() -> None:
    class Fatal(UplinkError):
        retriable = False

    class Again(UplinkError):
        retriable = True

    assert adapter.is_link_error(Again("x")) is True
    assert adapter.is_link_error(Fatal("x")) is False


def test_a_refused_destination_names_the_topic_and_the_reason() -> None:
    e = adapter.DestinationRefused("plant.x", "not authorised (TopicAuthorizationFailed)")
    assert (e.topic, e.reason, e.retriable) == ("plant.x", "not authorised (TopicAuthorizationFailed)", True)
    assert "plant.x" in str(e) and "not authorised" in str(e)


@pytest.mark.parametrize(("key", "java_hash"), [
    # Kafka's own test vectors for Utils.murmur2 (UtilsTest.testMurmur2), signed as Java has them.
    (b"21", -973932308), (b"foobar", -790332482), (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829), (b"abc", 479470107),
])
@pytest.mark.parametrize("n", [1, 3, 6, 7])
def test_keys_are_placed_by_the_java_default_partitioner(key: bytes, java_hash: int, n: int) -> None:
    # Java: Utils.toPositive(murmur2(key)) % numPartitions, toPositive = & 0x7fffffff.
    parts = [10 + i for i in range(n)]      # partition ids are looked up, not assumed 0..n-1
    assert adapter.murmur2_partition(key, parts) == parts[(java_hash & 0x7FFFFFFF) % n]


# ---------------------------------------------------------------- UplinkState


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def exposition(*states: UplinkState) -> dict[tuple[str, frozenset], float]:
    """A real scrape of a status document holding these states (what /metrics serves)."""
    doc = {"links": {s.name: s.as_dict() for s in states}}
    out = {}
    for line in GatewayMetrics(process=False).render(doc).decode().splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = frozenset(tuple(p.split("=", 1)) for p in re.findall(r'\w+="[^"]*"', m.group(2)))
            out[(m.group(1), frozenset((k, v.strip('"')) for k, v in labels))] = float(m.group(3))
    return out


def sample(expo, name: str, **labels: str) -> float | None:
    return expo.get((name, frozenset(labels.items())))


def lines(caplog, name: str = "outpost.uplinks") -> list[tuple[int, str, dict]]:
    return [(r.levelno, r.getMessage(), dict(getattr(r, "outpost_fields", {})))
            for r in caplog.records if r.name == name]


def test_a_new_state_is_down_with_its_counters_at_zero() -> None:
    s = UplinkState("kafka", counters=("delivered", "refused"))
    doc = s.as_dict()
    assert doc == {"up": False, "link": "down", "since_ms": s.since_ms, "server": None, "last_error": "",
                   "last_error_ms": None, "counters": {"delivered": 0, "refused": 0, "reconnects": 0},
                   "refused": {}}
    assert s.up is False and s.summary() == "kafka down"
    expo = exposition(s)
    for event in ("delivered", "refused", "reconnects"):
        assert sample(expo, "outpost_uplink_events_total", uplink="kafka", event=event) == 0
    assert sample(expo, "outpost_link_up", link="kafka") == 0
    assert sample(expo, "outpost_link_since_seconds", link="kafka") == s.since_ms / 1000


def test_counts_update_the_status_and_the_metric_together() -> None:
    s = UplinkState("kafka", counters=("delivered",))
    s.count("delivered", 1000)
    s.count("delivered")
    s.count("skipped", 2)           # an event not declared up front is counted all the same
    s.count("refused", 0)           # zero: the counter exists, and so does its series (at zero)
    s.count("delivered", -5)        # never goes backwards
    assert s.as_dict()["counters"] == {"delivered": 1001, "reconnects": 0, "skipped": 2, "refused": 0}
    expo = exposition(s)
    assert sample(expo, "outpost_uplink_events_total", uplink="kafka", event="delivered") == 1001
    assert sample(expo, "outpost_samples_published_total", uplink="kafka") == 1001
    assert sample(expo, "outpost_uplink_events_total", uplink="kafka", event="skipped") == 2
    assert sample(expo, "outpost_uplink_events_total", uplink="kafka", event="refused") == 0
    s.count("delivered", 5)         # the next scrape reads the state again
    assert s.counters["delivered"] == 1006
    assert sample(exposition(s), "outpost_uplink_events_total", uplink="kafka", event="delivered") == 1006


def test_the_link_goes_up_and_down_logged_once_per_outage(caplog) -> None:
    caplog.set_level(logging.DEBUG, "outpost.uplinks")
    s = UplinkState("mqtt", counters=("published",))
    s.link_up("tcp://a:1883")
    assert s.up and s.as_dict()["link"] == "up" and s.server == "tcp://a:1883"
    assert s.summary() == "mqtt up"
    up_since = s.since_ms
    expo = exposition(s)
    assert sample(expo, "outpost_link_up", link="mqtt") == 1
    assert sample(expo, "outpost_link_since_seconds", link="mqtt") == up_since / 1000
    assert lines(caplog) == [(logging.INFO, "link up", {"uplink": "mqtt", "server": "tcp://a:1883"})]
    caplog.clear()
    s.link_up("tcp://a:1883")       # no change: no line, same since
    assert lines(caplog) == [] and s.since_ms == up_since
    s.link_up("tcp://b:1883")       # another server: a line, the link did not change
    assert lines(caplog) == [(logging.INFO, "link up", {"uplink": "mqtt", "server": "tcp://b:1883"})]
    assert s.since_ms == up_since
    caplog.clear()

    s.link_down("connection refused", retry_in_s=2)
    doc = s.as_dict()
    assert (doc["up"], doc["link"], doc["last_error"], doc["server"]) == (False, "down", "connection refused",
                                                                           "tcp://b:1883")
    assert doc["last_error_ms"] is not None and doc["counters"]["reconnects"] == 1
    assert sample(exposition(s), "outpost_link_up", link="mqtt") == 0
    assert sample(exposition(s), "outpost_uplink_events_total", uplink="mqtt", event="reconnects") == 1
    s.link_down("connection refused", retry_in_s=4, server="tcp://c:1883")
    assert s.counters["reconnects"] == 1    # a failed retry while down is not a reconnect
    assert s.server == "tcp://c:1883"
    assert lines(caplog) == [
        (logging.WARNING, "link down", {"uplink": "mqtt", "server": "tcp://b:1883",
                                        "reason": "connection refused", "retry_in_s": 2}),
        (logging.DEBUG, "link still down", {"uplink": "mqtt", "reason": "connection refused", "retry_in_s": 4}),
    ]
    caplog.clear()
    s.link_up("tcp://c:1883")       # the recovery is logged once, with how long it lasted
    ((level, msg, f),) = lines(caplog)
    assert (level, msg, f["uplink"], f["server"], f["last_reason"]) == (
        logging.INFO, "link up", "mqtt", "tcp://c:1883", "connection refused")
    assert f["suppressed"] == 1 and "after_s" in f


def test_stopping_a_link_that_was_up_is_logged_and_shown(caplog) -> None:
    caplog.set_level(logging.INFO, "outpost.uplinks")
    s = UplinkState("bridge")
    s.stopped()
    assert s.link == "stopped" and lines(caplog) == []
    s2 = UplinkState("bridge")
    s2.link_up("tcp://local:1883")
    caplog.clear()
    s2.stopped()
    assert s2.as_dict()["link"] == "stopped" and not s2.up
    assert lines(caplog) == [(logging.INFO, "link stopped", {"uplink": "bridge", "server": "tcp://local:1883"})]


def test_an_error_that_keeps_the_link_up_is_logged_once_per_key(caplog) -> None:
    caplog.set_level(logging.INFO, "outpost.uplinks")
    s = UplinkState("kafka")
    s.link_up("k:9092")
    caplog.clear()
    assert s.error("m:format_error", "kafka record quarantined", seq=4, reason="not sparkplug") is True
    assert s.last_error == "not sparkplug" and s.last_error_ms is not None
    assert s.error("m:format_error", "kafka record quarantined", seq=5, reason="again") is False
    assert s.last_error == "again"
    assert s.error("m:too_large", "kafka record quarantined", seq=6) is True
    assert s.last_error == "kafka record quarantined"   # no reason: the message
    assert s.error("x", "odd", reason="") is True and s.last_error == "odd"
    assert s.up     # errors that are not the link's do not take it down
    assert [m[1:] for m in lines(caplog)] == [
        ("kafka record quarantined", {"uplink": "kafka", "seq": 4, "reason": "not sparkplug"}),
        ("kafka record quarantined", {"uplink": "kafka", "seq": 6}),
        ("odd", {"uplink": "kafka", "reason": ""}),
    ]


def test_a_refused_destination_is_held_probed_and_accepted_again(caplog) -> None:
    caplog.set_level(logging.INFO, "outpost.uplinks")
    s = UplinkState("kafka", counters=("delivered",))
    s.link_up("k:9092")
    caplog.clear()
    assert s.refuse("plant.secret", "not authorised") is True
    refused = s.as_dict()["refused"]["plant.secret"]
    assert refused["reason"] == "not authorised" and refused["probes"] == 0
    assert refused["since_ms"] == s.refused["plant.secret"].since_ms > 0
    assert s.refuse("plant.secret", "unknown topic") is False          # a probe that failed
    assert s.refuse("plant.secret", "unknown topic") is False
    assert s.as_dict()["refused"]["plant.secret"] == {"reason": "unknown topic", "probes": 2,
                                                      "since_ms": refused["since_ms"]}
    assert s.counters["refusals"] == 1
    assert sample(exposition(s), "outpost_uplink_events_total", uplink="kafka", event="refusals") == 1
    assert s.refuse("plant.other", "quota") is True
    assert s.summary() == "kafka up (2 refused)"
    assert s.up     # the link is fine: one destination says no
    caplog.clear()
    s.accept("plant.secret")
    ((_, msg, f),) = lines(caplog)
    assert (msg, f["uplink"], f["destination"]) == ("destination accepts again", "kafka", "plant.secret")
    s.accept("plant.secret")        # twice: the second is nothing
    s.accept("never.refused")
    assert list(s.as_dict()["refused"]) == ["plant.other"] and s.summary() == "kafka up (1 refused)"
    assert [m[1] for m in lines(caplog)] == ["destination accepts again"]


def test_each_refused_destination_is_logged_once_with_its_uplink(caplog) -> None:
    caplog.set_level(logging.INFO, "outpost.uplinks")
    s = UplinkState("kafka")
    s.refuse("plant.secret", "not authorised")
    s.refuse("plant.secret", "not authorised")
    s.refuse("plant.other", "quota")
    assert [m[1:] for m in lines(caplog)] == [
        ("destination refused", {"uplink": "kafka", "destination": "plant.secret", "reason": "not authorised"}),
        ("destination refused", {"uplink": "kafka", "destination": "plant.other", "reason": "quota"}),
    ]


def test_times_are_unix_milliseconds_of_the_change() -> None:
    t0 = time.time() * 1000
    s = UplinkState("kafka")
    t1 = time.time() * 1000
    assert t0 - 1 <= s.since_ms <= t1 + 1
    time.sleep(0.002)
    t0 = time.time() * 1000
    s.link_up("k:9092")
    t1 = time.time() * 1000
    assert t0 - 1 <= s.since_ms <= t1 + 1
    expo = exposition(s)
    assert sample(expo, "outpost_link_up", link="kafka") == 1
    assert sample(expo, "outpost_link_since_seconds", link="kafka") == s.since_ms / 1000
    assert s.as_dict()["up"] is True
    t0 = time.time() * 1000
    s.link_down("timeout")
    s.refuse("plant.x", "quota")
    t1 = time.time() * 1000
    assert t0 - 1 <= s.since_ms <= t1 + 1 and t0 - 1 <= s.last_error_ms <= t1 + 1
    assert t0 - 1 <= s.refused["plant.x"].since_ms <= t1 + 1
    assert s.as_dict()["up"] is False
    t0 = time.time() * 1000
    s.error("k", "odd")
    t1 = time.time() * 1000
    assert t0 - 1 <= s.last_error_ms <= t1 + 1


def test_the_status_document_includes_what_the_uplink_renders_in() -> None:
    s = UplinkState("kafka")
    calls = []

    def render() -> None:
        calls.append(1)
        s.extra["in_flight"] = len(calls)

    s.on_render = render
    assert s.as_dict()["in_flight"] == 1
    assert s.as_dict()["in_flight"] == 2


def test_a_state_logs_to_its_own_logger(caplog) -> None:
    caplog.set_level(logging.INFO)
    own = logging.getLogger("outpost.kafka")
    s = UplinkState("kafka", logger=own)
    s.link_down("timeout")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("outpost.kafka", "link down")]


# ---------------------------------------------------------------- held destinations


def test_held_records_are_found_again_by_their_reason_key() -> None:
    assert held_key("plant.secret") == HELD_PREFIX + "plant.secret" == "held:plant.secret"
    long = "t" * 300
    assert held_key(long) == ("held:" + long)[:200] and len(held_key(long)) == 200
    h = HeldDestination("plant.secret", Backoff(1, 2))
    assert h.reason_key == "held:plant.secret" and h.draining is False and h.next_probe == 0.0
    stats = {"quarantine": {"by_cursor_reason": {
        "kafka": {"held:plant.secret": 3, "too_large:m": 1, "held:plant.other": 1},
        "mqtt": {"held:spBv1.0/x": 2}}}}
    assert held_topics(stats, "kafka") == ["plant.secret", "plant.other"]
    assert held_topics(stats, "mqtt") == ["spBv1.0/x"]
    assert held_topics(stats, "bridge") == []
    assert held_topics({}, "kafka") == [] and held_topics({"quarantine": None}, "kafka") == []
    assert held_topics({"quarantine": {"by_cursor_reason": None}}, "kafka") == []
