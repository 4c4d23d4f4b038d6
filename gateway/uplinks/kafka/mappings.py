"""MQTT topic filters and the choice of Kafka mappings for a buffered record.

Pure code, no I/O: the Kafka uplink asks `MappingTable.select(topic)` which
`[[kafka.mappings]]` a record goes to, and the MQTT side asks
`MappingTable.bridged_filters()` which topics of other local clients to subscribe to
and store in the buffer. Filters follow MQTT 3.1.1/5 rules: `+` is exactly one level,
`#` is the parent level and everything below it and only allowed last, and a filter
that starts with a wildcard does not match topics starting with `$`.

A record that matches several mappings goes to each of them (in config order, each
mapping at most once even if several of its filters match). A record that matches none
is not sent to Kafka: the uplink counts it and moves its cursor past it, the way a
broker's MQTT-to-Kafka extension ignores topics no mapping names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.mqtt_topics import MappingError, topic_matches, validate_topic_filter

MappingFormat = Literal["sparkplug", "json", "raw"]
MappingKey = Literal["device", "topic"]

_FORMATS = ("sparkplug", "json", "raw")
_KEYS = ("device", "topic")
_SELECT_CACHE_MAX = 4096

__all__ = ["Mapping", "MappingError", "MappingTable", "topic_matches", "validate_topic_filter"]


@dataclass(frozen=True, slots=True)
class Mapping:
    """One `[[kafka.mappings]]` entry: MQTT topic filters to one Kafka topic."""

    name: str
    mqtt_topic_filters: tuple[str, ...]
    kafka_topic: str
    format: MappingFormat = "sparkplug"
    key: MappingKey = "device"
    subscribe: bool = False  # also bridge these topics from other clients on the local broker

    def __post_init__(self) -> None:
        where = f"kafka mapping {self.name!r}"
        if not self.mqtt_topic_filters:
            raise MappingError(f"{where}: mqtt_topic_filters is empty")
        for f in self.mqtt_topic_filters:
            try:
                validate_topic_filter(f)
            except MappingError as exc:
                raise MappingError(f"{where}: {exc}") from None
        if not self.kafka_topic or not isinstance(self.kafka_topic, str):
            raise MappingError(f"{where}: kafka_topic must be a non-empty string")
        if self.format not in _FORMATS:
            raise MappingError(f"{where}: format must be one of {_FORMATS}, got {self.format!r}")
        if self.key not in _KEYS:
            raise MappingError(f"{where}: key must be one of {_KEYS}, got {self.key!r}")

    @classmethod
    def from_config(cls, section: Any, default_name: str = "") -> Mapping:
        """Build from a config model (or any object/dict with the same field names)."""
        get = section.get if isinstance(section, dict) else lambda k, d=None: getattr(
            section, k, d
        )
        return cls(
            name=str(get("name", None) or default_name or get("kafka_topic", "")),
            mqtt_topic_filters=tuple(get("mqtt_topic_filters", ()) or ()),
            kafka_topic=get("kafka_topic", ""),
            format=get("format", "sparkplug"),
            key=get("key", "device"),
            subscribe=bool(get("subscribe", False)),
        )

    def matches(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.mqtt_topic_filters)


class MappingTable:
    """The configured mappings, in config order, with a bounded cache of topic lookups."""

    __slots__ = ("_cache", "mappings")

    def __init__(self, mappings: Iterable[Mapping]) -> None:
        self.mappings: tuple[Mapping, ...] = tuple(mappings)
        self._cache: dict[str, tuple[Mapping, ...]] = {}
        names = [m.name for m in self.mappings]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise MappingError(f"kafka mappings: duplicate mapping names {dupes}")

    def select(self, topic: str) -> tuple[Mapping, ...]:
        """Every mapping whose filters match `topic`, in config order, each once."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        found = tuple(m for m in self.mappings if m.matches(topic))
        if len(self._cache) >= _SELECT_CACHE_MAX:
            # Topics are few (one per device and message type); a full cache means churn,
            # so start over rather than track recency.
            self._cache.clear()
        self._cache[topic] = found
        return found

    def bridged_filters(self) -> list[str]:
        """Filters to subscribe to on the local broker for mappings with `subscribe = true`."""
        out: list[str] = []
        for m in self.mappings:
            if m.subscribe:
                out.extend(f for f in m.mqtt_topic_filters if f not in out)
        return out

    def overlaps(self) -> list[tuple[str, str, str]]:
        """Pairs of mappings whose filters can match the same topic: (mapping, mapping, example).

        Used to tell the user at startup that some records will go to several Kafka topics.
        """
        out = []
        for i, a in enumerate(self.mappings):
            for b in self.mappings[i + 1 :]:
                for fa in a.mqtt_topic_filters:
                    example = next(
                        (x for fb in b.mqtt_topic_filters if (x := _common_topic(fa, fb))), None
                    )
                    if example is not None:
                        out.append((a.name, b.name, example))
                        break
        return out


def _common_topic(fa: str, fb: str) -> str | None:
    """A topic that both filters match, or None when no such topic exists."""
    a, b = fa.split("/"), fb.split("/")
    out: list[str] = []
    i = 0
    while True:
        la = a[i] if i < len(a) else None
        lb = b[i] if i < len(b) else None
        if la is None and lb is None:
            break
        if la == "#" or lb == "#":
            rest = b[i:] if la == "#" else a[i:]
            out.extend("x" if r in ("+", "#") else r for r in rest)
            break
        if la is None or lb is None:
            return None
        if la == "+" and lb == "+":
            out.append("x")
        elif la == "+" or lb == "+":
            out.append(lb if la == "+" else la)
        elif la == lb:
            out.append(la)
        else:
            return None
        i += 1
    topic = "/".join(out)
    if not out or not (topic_matches(fa, topic) and topic_matches(fb, topic)):
        return None
    return topic


def mappings_from_config(sections: Sequence[Any]) -> MappingTable:
    """The table for `cfg.kafka.mappings`; unnamed mappings are called "mappings[i]"."""
    return MappingTable(
        Mapping.from_config(s, default_name=f"mappings[{i}]") for i, s in enumerate(sections)
    )
