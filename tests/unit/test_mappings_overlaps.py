"""Mapping overlaps (the example topic they share), filter validation edges, the select cache."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.uplinks.kafka import mappings as mp
from gateway.uplinks.kafka.mappings import Mapping, MappingError, MappingTable, mappings_from_config, topic_matches


def _m(name: str, *filters: str, **kw) -> Mapping:
    return Mapping(name=name, mqtt_topic_filters=filters, kafka_topic=f"k.{name}", **kw)


def test_overlaps_give_the_exact_example_topic() -> None:
    table = MappingTable([
        _m("a", "spBv1.0/+/DDATA/#"),
        _m("b", "spBv1.0/plant-7/+/edge/meter1"),
        _m("c", "lab/#"),
        _m("d", "nope/x", "lab/+/temp"),
        _m("e", "+/+"),
    ])
    assert table.overlaps() == [
        ("a", "b", "spBv1.0/plant-7/DDATA/edge/meter1"),
        ("c", "d", "lab/x/temp"),
        ("c", "e", "lab/x"),
        ("d", "e", "nope/x"),
    ]


def test_overlaps_report_each_pair_once_from_its_first_shared_filter() -> None:
    table = MappingTable([_m("a", "x/1", "y/#"), _m("b", "y/2", "x/+")])
    assert table.overlaps() == [("a", "b", "x/1")]
    assert MappingTable([_m("a", "x/1"), _m("b", "x/2")]).overlaps() == []
    assert MappingTable([_m("a", "x/#")]).overlaps() == []


@pytest.mark.parametrize(("fa", "fb", "example"), [
    ("a/b", "a/b", "a/b"),
    ("a/+", "+/b", "a/b"),
    ("+/+", "+/+", "x/x"),
    ("#", "#", "x"),
    ("#", "a/+/c", "a/x/c"),
    ("a/+/#", "#", "a/x/x"),
    ("a/#", "a", "a"),         # '#' includes the parent level
    ("a", "a/#", "a"),
    ("a/b", "a/c", None),
    ("a/b", "a", None),
    ("a", "a/b", None),
    ("a/+", "a", None),
    ("+/b", "$SYS/b", None),   # a filter starting with a wildcard never matches '$' topics
    ("$SYS/#", "$SYS/+/x", "$SYS/x/x"),
])
def test_common_topic(fa: str, fb: str, example: str | None) -> None:
    assert mp._common_topic(fa, fb) == example
    assert mp._common_topic(fb, fa) == example


_LEVELS = ["a", "b", "+", "$S", ""]
_TOPIC_LEVELS = ["a", "b", "x", "$S", ""]
_TOPICS = ["/".join(t) for n in range(1, 5) for t in itertools.product(_TOPIC_LEVELS, repeat=n)]  # to 4 levels


def _filter(levels: list[str], hash_tail: bool) -> str:
    return "/".join([*levels, "#"] if hash_tail else levels)


@settings(deadline=None)  # scans a universe of topics: no per-example deadline on a busy machine
@given(st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=3), st.booleans(),
       st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=3), st.booleans())
def test_common_topic_exists_exactly_when_some_topic_matches_both(la, ha, lb, hb) -> None:
    fa, fb = _filter(la, ha), _filter(lb, hb)
    example = mp._common_topic(fa, fb)
    if example is not None:
        assert topic_matches(fa, example) and topic_matches(fb, example)
    else:
        # no topic of the small universe (levels up to 4 deep) matches both
        assert not any(topic_matches(fa, t) and topic_matches(fb, t) for t in _TOPICS)


def test_filter_validation_edges() -> None:
    for good in ("#", "+", "a/+/#", "/", "a//b", "+/+/+", "$SYS/#"):
        mp.validate_topic_filter(good)
    for bad, fragment in ((None, "non-empty string"), (5, "non-empty string"),
                          ("a/\x00", "NUL"), ("#/a", "last one"), ("a/b#", "whole level"),
                          ("a/++", r"'\+' must be a whole level")):
        with pytest.raises(MappingError, match=fragment):
            mp.validate_topic_filter(bad)


def test_mapping_defaults_and_kafka_topic_type() -> None:
    m = Mapping("n", ("a/#",), "t")
    assert (m.format, m.key, m.subscribe) == ("sparkplug", "device", False)
    with pytest.raises(MappingError, match="kafka mapping 'n': kafka_topic must be a non-empty string"):
        Mapping("n", ("a/#",), 5)  # type: ignore[arg-type]
    with pytest.raises(MappingError, match=r"kafka mapping 'n': topic filter 'a/#/b'"):
        Mapping("n", ("a/#", "a/#/b"), "t")
    assert m.matches("a/b") and not m.matches("b")
    assert Mapping("two", ("x", "y/+"), "t").matches("y/1")


def test_from_config_names_and_defaults() -> None:
    table = mappings_from_config([
        {"mqtt_topic_filters": ["a/#"], "kafka_topic": "t0"},
        {"name": "", "mqtt_topic_filters": ("b/#",), "kafka_topic": "t1", "subscribe": 1},
    ])
    first, second = table.mappings
    assert first.name == "mappings[0]" and second.name == "mappings[1]"
    assert second.subscribe is True and second.mqtt_topic_filters == ("b/#",)
    assert Mapping.from_config({"mqtt_topic_filters": ["a/#"], "kafka_topic": "t9"}).name == "t9"
    with pytest.raises(MappingError, match="mqtt_topic_filters is empty"):
        Mapping.from_config({"kafka_topic": "t", "mqtt_topic_filters": None})

    class Bare:
        mqtt_topic_filters = ("c/#",)
        kafka_topic = "tb"

    bare = Mapping.from_config(Bare(), default_name="given")
    assert (bare.name, bare.format, bare.key, bare.subscribe) == ("given", "sparkplug", "device", False)


def test_duplicate_names_are_listed_sorted_once() -> None:
    with pytest.raises(MappingError, match=r"duplicate mapping names \['x', 'y'\]"):
        MappingTable([_m("y", "a"), _m("x", "a"), _m("y", "b"), _m("x", "b"), _m("z", "c"), _m("x", "d")])


def test_select_cache_is_bounded_and_answers_stay_right() -> None:
    table = MappingTable([_m("x", "x/+")])
    for i in range(4096):                       # the bound: 4096 topics
        table.select(f"x/{i}")
    assert len(table._cache) == 4096
    assert [m.name for m in table.select("x/new")] == ["x"]
    assert len(table._cache) == 1  # a full cache starts over
    assert table.select("x/new") is table.select("x/new")
    assert table.select("x/0") == table.mappings


def test_bridged_filters_keep_config_order() -> None:
    table = MappingTable([_m("a", "z/#", "a/#", subscribe=True), _m("b", "a/#", "m/+", subscribe=True),
                          _m("c", "q/#")])
    assert table.bridged_filters() == ["z/#", "a/#", "m/+"]
    assert MappingTable([]).bridged_filters() == []


def test_from_config_prefers_the_given_name_and_names_what_is_missing() -> None:
    class Section:
        name = "obj"
        mqtt_topic_filters = ["a/#"]
        kafka_topic = "t1"

    table = mappings_from_config([Section(), {"name": "d", "mqtt_topic_filters": ["b/+"], "kafka_topic": "t2"}])
    assert [m.name for m in table.mappings] == ["obj", "d"]
    with pytest.raises(MappingError, match="kafka mapping '': kafka_topic must be a non-empty string"):
        Mapping.from_config({"mqtt_topic_filters": ["a/#"]})
