"""MQTT topic-filter matching and Kafka mapping selection (pure)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.uplinks.kafka.mappings import (
    Mapping,
    MappingError,
    MappingTable,
    mappings_from_config,
    topic_matches,
    validate_topic_filter,
)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("spBv1.0/+/DDATA/#", "spBv1.0/plant-7/DDATA/edge/meter1", True),
        ("spBv1.0/+/DDATA/#", "spBv1.0/plant-7/NDATA/edge", False),
        ("spBv1.0/+/DDATA/#", "spBv1.0/plant-7/DDATA", True),  # '#' includes the parent
        ("a/#", "a", True),
        ("a/#", "ab", False),
        ("#", "a/b/c", True),
        ("#", "$SYS/broker/load", False),  # wildcards do not match '$' topics
        ("+/broker/load", "$SYS/broker/load", False),
        ("$SYS/#", "$SYS/broker/load", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # '+' matches an empty level
        ("+/+", "/x", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/d", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "+a/b", "a/\x00"])
def test_invalid_filters_are_rejected_with_the_filter_named(bad: str) -> None:
    with pytest.raises(MappingError) as err:
        validate_topic_filter(bad)
    assert repr(bad) in str(err.value)


def _reference_match(topic_filter: str, topic: str) -> bool:
    """An independent regex translation of the MQTT matching rules."""
    if topic.startswith("$") and topic_filter[:1] in "+#":
        return False
    parts = []
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            # '#' matches the parent level too: drop the separator before it.
            return re.fullmatch("/".join(parts) + ("(/.*)?" if parts else ".*"), topic) is not None
        parts.append("[^/]*" if level == "+" else re.escape(level))
        if i == len(levels) - 1:
            break
    return re.fullmatch("/".join(parts), topic) is not None


_level = st.sampled_from(["a", "b", "spBv1.0", "", "$SYS"])


@given(
    st.lists(st.sampled_from(["a", "b", "+", "", "$SYS"]), min_size=1, max_size=4),
    st.booleans(),
    st.lists(_level, min_size=1, max_size=5),
)
def test_matching_agrees_with_a_regex_reference(levels, hash_tail, topic_levels) -> None:
    topic_filter = "/".join([*levels, "#"] if hash_tail else levels)
    topic = "/".join(topic_levels)
    assert topic_matches(topic_filter, topic) == _reference_match(topic_filter, topic)


def _m(name: str, *filters: str, **kw) -> Mapping:
    return Mapping(name=name, mqtt_topic_filters=filters, kafka_topic=f"k.{name}", **kw)


def test_select_returns_every_matching_mapping_in_config_order_each_once() -> None:
    table = MappingTable(
        [
            _m("all-ddata", "spBv1.0/+/DDATA/#", "spBv1.0/plant-7/DDATA/#"),  # both filters hit
            _m("ndata", "spBv1.0/+/NDATA/#"),
            _m("plant7", "spBv1.0/plant-7/#", format="json"),
        ]
    )
    got = table.select("spBv1.0/plant-7/DDATA/edge/meter1")
    assert [m.name for m in got] == ["all-ddata", "plant7"]
    assert [m.name for m in table.select("spBv1.0/plant-7/NDATA/edge")] == ["ndata", "plant7"]


def test_select_no_match_is_empty() -> None:
    table = MappingTable([_m("ddata", "spBv1.0/+/DDATA/#")])
    assert table.select("factory/line1/temp") == ()
    assert table.select("spBv1.0/g/DBIRTH/e/d") == ()


def test_select_cache_returns_the_same_answers_after_many_topics() -> None:
    table = MappingTable([_m("x", "x/+")])
    for i in range(10_000):
        assert len(table.select(f"x/{i}")) == 1
        assert table.select(f"y/{i}") == ()


def test_bridged_filters_only_from_subscribing_mappings_without_duplicates() -> None:
    table = MappingTable(
        [
            _m("own", "spBv1.0/+/DDATA/#"),
            _m("lab", "lab/+/temp", "lab/#", subscribe=True, format="raw", key="topic"),
            _m("lab2", "lab/#", subscribe=True, format="raw"),
        ]
    )
    assert table.bridged_filters() == ["lab/+/temp", "lab/#"]


def test_overlaps_reports_mappings_that_share_topics() -> None:
    table = MappingTable(
        [
            _m("a", "spBv1.0/+/DDATA/#"),
            _m("b", "spBv1.0/plant-7/+/edge/meter1"),
            _m("c", "lab/#"),
        ]
    )
    overlaps = table.overlaps()
    assert [(a, b) for a, b, _ in overlaps] == [("a", "b")]
    example = overlaps[0][2]
    assert topic_matches("spBv1.0/+/DDATA/#", example)
    assert topic_matches("spBv1.0/plant-7/+/edge/meter1", example)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mqtt_topic_filters": ()}, "mqtt_topic_filters is empty"),
        ({"mqtt_topic_filters": ("a/#/b",)}, "'#' must be"),
        ({"kafka_topic": ""}, "kafka_topic"),
        ({"format": "avro"}, "format must be one of"),
        ({"key": "partition"}, "key must be one of"),
    ],
)
def test_invalid_mapping_names_the_mapping_and_the_problem(kwargs, fragment) -> None:
    base = {"name": "telemetry", "mqtt_topic_filters": ("a/#",), "kafka_topic": "t"}
    with pytest.raises(MappingError) as err:
        Mapping(**{**base, **kwargs})
    assert "telemetry" in str(err.value)
    assert fragment in str(err.value)


def test_duplicate_mapping_names_are_rejected() -> None:
    with pytest.raises(MappingError, match="duplicate"):
        MappingTable([_m("x", "a/#"), _m("x", "b/#")])


def test_from_config_accepts_dicts_and_objects() -> None:
    class Section:
        name = "obj"
        mqtt_topic_filters = ["a/#"]
        kafka_topic = "t1"
        format = "raw"
        key = "topic"
        subscribe = True

    table = mappings_from_config(
        [Section(), {"name": "d", "mqtt_topic_filters": ["b/+"], "kafka_topic": "t2"}]
    )
    obj, d = table.mappings
    assert (obj.format, obj.key, obj.subscribe, obj.mqtt_topic_filters) == (
        "raw",
        "topic",
        True,
        ("a/#",),
    )
    assert (d.format, d.key, d.subscribe) == ("sparkplug", "device", False)
