"""The Kafka message headers are a contract with consumers outside this repository (their
de-duplication and clock handling read them by name): the names the README documents are
the names the formatter writes."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.uplinks.kafka import format as kafka_format

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_header_names_are_the_documented_ones() -> None:
    names = (kafka_format.H_GATEWAY, kafka_format.H_STREAM, kafka_format.H_SEQ, kafka_format.H_TOPIC,
             kafka_format.H_TYPE, kafka_format.H_CLOCK)
    assert names == ("outpost-gateway", "outpost-stream", "outpost-seq", "outpost-topic", "outpost-type",
                     "outpost-clock")
    documented = set(re.findall(r"`(outpost-[a-z]+)", README))
    assert {"outpost-gateway", "outpost-stream", "outpost-seq", "outpost-clock"} <= documented
