"""MQTT topic names and filters (the grammar of MQTT 3.1.1/5 section 4.7): one parser for all.

Used by the configuration check, the Kafka mappings and the bridge's subscriptions.
"""

from __future__ import annotations

from gateway.errors import OutpostError


class MappingError(OutpostError):
    """A mapping or topic filter is invalid (configuration problem, not retriable)."""


def validate_topic_filter(topic_filter: str) -> None:
    """Raise MappingError naming the problem if `topic_filter` is not a valid MQTT filter."""
    if not isinstance(topic_filter, str) or topic_filter == "":
        raise MappingError(f"topic filter {topic_filter!r}: must be a non-empty string")
    if "\x00" in topic_filter:
        raise MappingError(f"topic filter {topic_filter!r}: contains a NUL character")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise MappingError(
                f"topic filter {topic_filter!r}: '#' must be a whole level and the last one"
            )
        if "+" in level and level != "+":
            raise MappingError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when the MQTT `topic` (no wildcards) matches `topic_filter`."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            # "a/#" matches "a" as well as everything below it.
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
